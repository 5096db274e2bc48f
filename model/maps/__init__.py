"""What a localisation map becomes (SPEC §6–§7, §9): fusion into Φ, coarse masks, keypoints."""
