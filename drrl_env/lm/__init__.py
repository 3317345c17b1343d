"""The language model and its text.

Loading models, corpora and splits, the stepped forward pass, scoring (KL, LM loss, perplexity) with
ranks in place, and the atomic files and caches around them. Imports only :mod:`drrl_env.attention`.
"""
