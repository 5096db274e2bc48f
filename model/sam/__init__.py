"""SAM2 (SPEC §8): the predictor that owns a video's image features, and the prompting routine."""
