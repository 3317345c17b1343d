"""Rank policies of DRRL-KVCache-v0 that are not learned, at the episode's key-cache bytes (``drrl_env.kvcache``).

Each is a :class:`oracle.policy.RankPolicy` (``act(observation, action_mask, env)`` on the unwrapped env) that
plans the episode at its first layer, mostly by the water-fill (:func:`drrl_env.profiles.waterfill.allocate_ranks`)
of a ``(L, K)`` decode profile over the layers' key-byte shares (:meth:`DRRLKVCacheEnv.waterfill_plan`):

* ``uniform``: every layer at the largest candidate the budget allows for all of them;
* ``static``: the water-fill of a validation decode profile (:meth:`DRRLKVCacheEnv.static_profile`: one
  allocation for every prompt, chosen on validation text);
* ``energy``: the water-fill of the share of each layer's key energy (the prefix's key spectrum, per head) outside
  each candidate's top singular directions (:func:`drrl_env.generation.decode_profile.key_energy_residuals`: the
  adaptive-SVD energy criterion, spent at the budget);
* ``logit_error``: the water-fill of the observation's own statistic, the observed tokens' relative logit error
  at each candidate (a fixed rule on what the agent sees);
* ``attention_kl``: the water-fill of how far each layer's basis at each candidate moves the observed tokens'
  attention distributions (:func:`drrl_env.generation.decode_profile.observed_attention_kls`: the logit error
  weighed by the attention each key gets; causal and cheap);
* ``self_profile``: the water-fill of the prompt's own decode profile over its observed tokens (the prompt's
  cache scored on the ``observe_tokens`` the model generated first): causal, so an agent could learn it, but it
  costs a prefill per candidate and a continuation per cell (the teacher);
* ``hindsight``: the water-fill of the decode profile of the scored tokens themselves after the prefix: it sees
  the text it is scored on, so it is a ceiling, not a policy;
* ``random``: a seeded draw among the allowed candidates at each layer.

Headroom captured by a policy: ``(KL_static - KL_policy) / (KL_static - KL_hindsight)``. What a policy's decision
costs is :func:`decision_flops`, against :func:`generation_flops` of the tokens it allocates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from drrl_env.generation.decode_profile import decode_kl_profile, key_energy_residuals
from drrl_env.kvcache import DRRLKVCacheEnv

KV_POLICIES = ("uniform", "static", "energy", "logit_error", "attention_kl", "self_profile", "hindsight", "random")
KV_CEILINGS = ("hindsight",)
"""policies that see the scored text: ceilings, not policies; their decision cost is not defined"""


def energy_profile(env: DRRLKVCacheEnv) -> np.ndarray:
    """``(L, K)`` the prefix's key energy outside each candidate's top directions, per layer (heads averaged)."""
    return key_energy_residuals(env.loaded, env.current_prompt.prefix, env.config.ranks, env.config.sink_tokens)


def logit_error_profile(env: DRRLKVCacheEnv) -> np.ndarray:
    """``(L, K)`` the observed tokens' relative logit errors: the observation's first ``K`` entries, every layer."""
    return env.current_prompt.observed_errors


def self_profile(env: DRRLKVCacheEnv) -> np.ndarray:
    """``(L, K)`` the prompt's own decode profile over its observed tokens (the teacher; causal)."""
    cfg = env.config
    return decode_kl_profile(
        env.loaded, env.prompt_ids, cfg.ranks, cfg.observe_tokens, cfg.basis,
        sink_tokens=cfg.sink_tokens, recent_tokens=cfg.recent_tokens,
    )  # fmt: skip


def hindsight_profile(env: DRRLKVCacheEnv) -> np.ndarray:
    """``(L, K)`` the decode profile of the scored tokens after the prefix (sees the scored text: a ceiling)."""
    cfg, state = env.config, env.current_prompt
    return decode_kl_profile(
        env.loaded, state.prefix, cfg.ranks, cfg.horizon, cfg.basis,
        sink_tokens=cfg.sink_tokens, recent_tokens=cfg.recent_tokens,
    )  # fmt: skip


PROFILES: dict[str, Callable[[DRRLKVCacheEnv], np.ndarray]] = {
    "static": DRRLKVCacheEnv.static_profile,
    "energy": energy_profile,
    "logit_error": logit_error_profile,
    "attention_kl": DRRLKVCacheEnv.observed_attention_kls,
    "self_profile": self_profile,
    "hindsight": hindsight_profile,
}
"""the profile each water-filling policy spends"""


class PlannedPolicy:
    """A policy that plans the whole allocation at the first layer (``planner(env)``) and plays it."""

    def __init__(self, name: str, planner: Callable[[DRRLKVCacheEnv], list[int]]) -> None:
        self.name, self.planner, self.plan = name, planner, []

    def reset(self, seed: int) -> None:
        self.plan = []

    def act(self, observation: np.ndarray, action_mask: np.ndarray, env: DRRLKVCacheEnv) -> int:
        if env.layer == 0 or not self.plan:
            self.plan = [int(index) for index in self.planner(env)]
        return self.plan[env.layer]


class ProfilePolicy(PlannedPolicy):
    """The water-fill of a profile (:data:`PROFILES`), measured once per prompt and kept (``profiles``).

    A prompt's profile does not depend on the budget, so a policy played at several budgets on a prompt measures it
    once; the kept profiles are keyed by the env's config and the prompt (its index in the pool, or its tokens).
    """

    def __init__(self, name: str) -> None:
        super().__init__(name, self._plan)
        self.profiles: dict[Any, np.ndarray] = {}

    def profile(self, env: DRRLKVCacheEnv) -> np.ndarray:
        """``(L, K)`` this policy's profile of the env's current prompt (the static one: the same for every prompt)."""
        prompt = env.prompt_index if env.prompt_index >= 0 else tuple(env.prompt_ids[0].tolist())  # own prompts
        key = (env.config, None if self.name == "static" else prompt)
        if key not in self.profiles:
            self.profiles[key] = PROFILES[self.name](env)
        return self.profiles[key]

    def _plan(self, env: DRRLKVCacheEnv) -> list[int]:
        return env.waterfill_plan(self.profile(env))


class RandomPolicy:
    """A seeded draw among the candidates the mask allows, layer by layer (``reset(seed)`` reseeds it)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def reset(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def act(self, observation: np.ndarray, action_mask: np.ndarray, env: DRRLKVCacheEnv) -> int:
        return int(self.rng.choice(np.flatnonzero(action_mask)))


def kv_policy(name: str, seed: int = 0) -> PlannedPolicy | RandomPolicy:
    """The policy ``name`` (:data:`KV_POLICIES`)."""
    if name == "random":
        return RandomPolicy(seed)
    if name == "uniform":
        return PlannedPolicy(name, DRRLKVCacheEnv.uniform_plan)
    if name not in PROFILES:
        raise ValueError(f"KV-cache policy must be one of {KV_POLICIES}, got {name!r}")
    return ProfilePolicy(name)


def play(env: DRRLKVCacheEnv, policy: Any, observation: np.ndarray, seed: int = 0) -> dict:
    """Play the env's current episode with ``policy`` (a RankPolicy) from ``observation`` (reset's); the last info.

    The last info holds ``kl`` and ``ranks``. A candidate the mask refuses plays the largest allowed below it (the
    env's rule). ``seed`` reseeds the policy (``policy.reset``) first.
    """
    policy.reset(seed)
    info: dict = {}
    for _ in range(env.num_layers):
        observation, _, terminated, _, info = env.step(policy.act(observation, env.action_masks(), env))
    assert terminated, "an episode of DRRL-KVCache-v0 has one step per layer"
    return info


def forward_flops(env: DRRLKVCacheEnv, tokens: int) -> float:
    """FLOPs of the full model over ``tokens`` tokens' weights: ``2 P`` per token (attention's own share left out)."""
    parameters = sum(parameter.numel() for parameter in env.loaded.model.parameters())
    return 2.0 * parameters * tokens


def generation_flops(env: DRRLKVCacheEnv, tokens: int | None = None) -> float:
    """FLOPs of generating ``tokens`` tokens (default: the scored ``horizon``) at ``context`` keys: an estimate.

    The weights' ``2 P`` per token plus full attention's logits and values over the context (``4 n d`` per query
    head and layer): what the allocation serves, at full width.
    """
    cfg, shape = env.config, env.loaded.attention_shape
    tokens = cfg.horizon if tokens is None else tokens
    keys = cfg.context + cfg.observe_tokens
    attention = 4.0 * keys * shape.head_dim * shape.q_heads * shape.num_layers
    return forward_flops(env, tokens) + tokens * attention


def decision_flops(env: DRRLKVCacheEnv, name: str) -> float:
    """FLOPs of the signal a non-learned policy ``name`` computes per prompt before it commits: an estimate.

    ``uniform``, ``random``: 0; ``static``: 0 per prompt (its profile is computed once, on validation text);
    ``energy``: each layer's and key/value head's key Gram over the prefix (``2 n d^2``) and its eigenvalues (about
    ``10 d^3``; the forward pass is the generation's own); ``logit_error``: the observation's statistics
    (:meth:`DRRLKVCacheEnv.observation_flops`); ``attention_kl``: :meth:`DRRLKVCacheEnv.attention_kl_flops`;
    ``self_profile``: the forward
    passes of ``decode_kl_profile`` over the prompt (a prefill of ``context`` tokens at full width and at each
    candidate below the head dimension, the greedy continuation and its reference over ``observe_tokens``, and
    ``observe_tokens`` teacher-forced tokens per layer and candidate below it), weights only; ``hindsight``: NaN
    (a ceiling that sees the scored text).
    """
    cfg = env.config
    below = sum(1 for rank in cfg.ranks if rank < env.head_dim)
    if name in KV_CEILINGS:
        return float("nan")
    if name == "logit_error":
        return env.observation_flops()
    if name == "attention_kl":
        return env.attention_kl_flops()
    if name == "energy":
        d, keys = env.head_dim, cfg.context + cfg.observe_tokens
        return float(env.num_layers * env.loaded.attention_shape.kv_heads * (2 * keys * d**2 + 10 * d**3))
    if name == "self_profile":
        tokens = (1 + below) * cfg.context + 2 * cfg.observe_tokens + env.num_layers * below * cfg.observe_tokens
        return forward_flops(env, tokens)
    if name in KV_POLICIES:
        return 0.0
    raise ValueError(f"KV-cache policy must be one of {KV_POLICIES}, got {name!r}")
