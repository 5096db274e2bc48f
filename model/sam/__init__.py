"""SAM2 (SPEC §8): the predictor that owns a video's image features, and the prompting routine.

The defaults below are read by the flag parsers (:mod:`model.settings`) before torch loads, so they live here,
in a module that imports nothing.
"""

#: the paper's SAM 2.0 Hiera-L (SPEC §8.1): config name inside the sam2 package, and the checkpoint under ckpts/
DEFAULT_SAM2_CONFIG = "sam2_hiera_l.yaml"
DEFAULT_SAM2_CHECKPOINT = "ckpts/sam2-hiera-large/sam2_hiera_large.pt"
#: SAM2 objects per batch; 1 runs each object alone, the per-object computation and the bit-exact default (§8.10)
DEFAULT_SAM2_BATCH = 1
