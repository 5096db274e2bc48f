"""Attention capture and rollout (SPEC §4–§5): the prompts, the capture hooks, the rollout and its kernels,
and the pipeline that runs the five calls of an expression."""
