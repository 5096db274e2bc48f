"""The install self-test (``python -m model.selftest``, :mod:`model.selftest.run`) and the tiny random-weight
checkpoints it builds.

The tiny builders (:mod:`model.selftest.tiny`) make real checkpoints of every family from small configs; the tests,
the demo's ``--tiny`` mode and the self-test all load them with the same ``from_pretrained`` code as real weights.
This package imports nothing itself, so that the flag parsers can read the offline preset's settings
(:mod:`model.selftest.tiny.preset`) without loading the self-test.
"""
