"""drrl_env: the DR-RL rank-selection environments and the low-rank attention math they run on.

Importing it registers ``DRRL-Attention-v0`` (the recommended MDP), ``DRRL-Attention-PerLayer-v0`` and
``DRRL-Attention-Paper-v0`` (:data:`drrl_env.config.VARIANTS`; docs/env.md). Rooms: ``attention`` (the maths),
``lm`` (models, corpora, scoring), ``profiles`` (what each rank costs on an input, the water-fill),
``generation`` (the low-rank key cache); the env's own modules sit at the top.
"""

from drrl_env.attention.hook import AttentionCall, AttentionHook, UnsupportedModelError, install
from drrl_env.attention.lowrank import SPECTRAL_MODES, full_attention, low_rank_attention
from drrl_env.config import ENV_ID, PAPER_ENV_ID, PER_LAYER_ENV_ID, VARIANTS
from drrl_env.kvcache import KVCACHE_ENV_ID
from drrl_env.lm.models import DEFAULT_MODEL, LoadedModel, ModelNotAvailableError, load_causal_lm
from drrl_env.replay import ReplayResult, replay

__all__ = [
    "DEFAULT_MODEL",
    "ENV_ID",
    "KVCACHE_ENV_ID",
    "PAPER_ENV_ID",
    "PER_LAYER_ENV_ID",
    "VARIANTS",
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

if KVCACHE_ENV_ID not in _gym.registry:  # the key cache of generation (drrl_env.kvcache)
    _gym.register(id=KVCACHE_ENV_ID, entry_point="drrl_env.kvcache:DRRLKVCacheEnv")

for _env_id, _variant in VARIANTS.items():  # one register per variant, as gymnasium/envs/__init__.py does
    if _env_id not in _gym.registry:
        _gym.register(
            id=_env_id,
            entry_point="drrl_env.env:DRRLAttentionEnv",
            vector_entry_point="drrl_env.vector:DRRLAttentionVectorEnv",  # gym.make_vec: one batched forward pass
            kwargs=dict(_variant),
        )
