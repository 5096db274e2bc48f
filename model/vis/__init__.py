"""Pictures a person can look at: overlays, contact sheets and videos of a run's outputs."""
