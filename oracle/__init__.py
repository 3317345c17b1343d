"""oracle: the greedy oracle over DRRL-Attention-v0 and its trajectory datasets (issue 5; not built yet)."""
