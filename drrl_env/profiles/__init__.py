"""Per-input and validation profiles, and the water-fill that spends a budget over a profile.

A profile says what each layer's (or key/value group's) rank costs on a text.

Imports :mod:`drrl_env.lm` and :mod:`drrl_env.attention`, never the env.
"""
