"""Generation with a low-rank key cache: key-basis attention, the cache, greedy decoding, decode profiles.

Imports :mod:`drrl_env.profiles`, :mod:`drrl_env.lm` and :mod:`drrl_env.attention`, never the env.
"""
