"""drrl_env: the DR-RL rank-selection environment and the low-rank attention math it runs on."""

from drrl_env.hook import AttentionCall, AttentionHook, UnsupportedModelError, install
from drrl_env.lowrank import SPECTRAL_MODES, full_attention, low_rank_attention
from drrl_env.models import DEFAULT_MODEL, LoadedModel, ModelNotAvailableError, load_causal_lm

__all__ = [
    "DEFAULT_MODEL",
    "SPECTRAL_MODES",
    "AttentionCall",
    "AttentionHook",
    "LoadedModel",
    "ModelNotAvailableError",
    "UnsupportedModelError",
    "full_attention",
    "install",
    "load_causal_lm",
    "low_rank_attention",
]

import gymnasium as _gym

ENV_ID = "DRRL-Attention-v0"
if ENV_ID not in _gym.registry:
    _gym.register(id=ENV_ID, entry_point="drrl_env.env:DRRLAttentionEnv")
