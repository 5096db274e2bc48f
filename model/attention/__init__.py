"""Attention capture and rollout (SPEC §4–§5): the prompts, the capture hooks, the rollout and its kernels,
and the pipeline that runs the five calls of an expression."""

# Defaults the flag parsers read before torch loads (model/settings.py), so they live here, in a module that imports
# nothing.
#: frame-level conversations per forward pass in the paper's scripts (SPEC §13.4); only memory depends on it (§5.6)
DEFAULT_ATTN_MAX_BATCH = 4
#: the row-vector rollout (SPEC §5.8a); "literal" is the L×L oracle of §5.2–§5.4
DEFAULT_ROLLOUT_IMPL = "streamed"
