"""Tiny random-weight checkpoints of the real model classes, for tests and the install self-test."""
