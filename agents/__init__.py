"""agents: policies, behaviour cloning, the algorithm registry and baselines (issues 5-6; not built yet)."""
