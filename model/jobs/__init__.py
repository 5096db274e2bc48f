"""Jobs: what a run does (one per expression, SPEC §10) and the runner that does each exactly once (§10.9)."""
