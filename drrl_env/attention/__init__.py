"""Attention maths: low-rank attention (Eqs. 1-5), spectra, perturbation bounds, FLOPs, key bases, the hook.

Imports nothing else of drrl_env: every other room builds on it.
"""
