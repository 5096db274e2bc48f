"""The install self-test (``python -m model.selftest``) and the tiny random-weight checkpoints it builds.

The tiny builders (:mod:`model.selftest.tiny`) make real checkpoints of every family from small configs; the tests,
the demo's ``--tiny`` mode and the self-test all load them with the same ``from_pretrained`` code as real weights.
"""
from model.selftest.run import DISCLAIMER, main

__all__ = ["DISCLAIMER", "main"]
