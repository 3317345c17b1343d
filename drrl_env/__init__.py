"""drrl_env: the DR-RL rank-selection environment and the low-rank attention math it runs on."""

from drrl_env.hook import AttentionCall, AttentionHook, UnsupportedModelError, install
from drrl_env.lowrank import SPECTRAL_MODES, full_attention, low_rank_attention
from drrl_env.models import DEFAULT_MODEL, LoadedModel, ModelNotAvailableError, load_causal_lm
from drrl_env.replay import ReplayResult, replay

__all__ = [
    "DEFAULT_MODEL",
    "SPECTRAL_MODES",
    "AttentionCall",
    "AttentionHook",
    "LoadedModel",
    "ModelNotAvailableError",
    "ReplayResult",
    "UnsupportedModelError",
    "full_attention",
    "install",
    "load_causal_lm",
    "low_rank_attention",
    "replay",
]

import os as _os

import gymnasium as _gym
import torch as _torch

# A process forked after torch has used its OpenMP/LAPACK thread pools deadlocks in its first
# parallel op (seen with gym.make_vec(..., "async"), whose default start method on Linux is fork).
# One intra-op thread per forked worker avoids the pools, and is what one env per process wants.
_os.register_at_fork(after_in_child=lambda: _torch.set_num_threads(1))

ENV_ID = "DRRL-Attention-v0"
if ENV_ID not in _gym.registry:
    _gym.register(id=ENV_ID, entry_point="drrl_env.env:DRRLAttentionEnv")
