"""Rank policies of DRRL-KVCache-v0 that are not learned, at the episode's key-cache bytes (``drrl_env.kvcache``).

Each returns a candidate index per layer for the env's current episode, spent by the water-fill
(:func:`drrl_env.profiles.waterfill.allocate_ranks`) of a decode profile over the layers' key-byte shares:

* ``uniform``: every layer at the largest candidate the budget allows for all of them;
* ``static``: the water-fill of a validation decode profile (``oracle.static.validation_profile`` with the
  ``decode`` estimate: one allocation for every prompt, chosen on validation text);
* ``self_profile``: the water-fill of the prompt's own decode profile over its observed tokens (the prompt's
  cache scored on the ``observe_tokens`` the model generated first): causal, so an agent could learn it, but it
  costs a prefill per candidate and a continuation per cell (the teacher);
* ``hindsight``: the water-fill of the decode profile of the scored tokens themselves after the prefix: it sees
  the text it is scored on, so it is a ceiling, not a policy;
* ``random``: a seeded draw among the allowed candidates at each layer.

Headroom captured by a policy: ``(KL_static - KL_policy) / (KL_static - KL_hindsight)``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from drrl_env.generation.decode_profile import decode_kl_profile
from drrl_env.kvcache import DRRLKVCacheEnv
from drrl_env.lm.corpora import DEFAULT_CORPUS, EVALUATION_ONLY
from drrl_env.profiles.waterfill import allocate_ranks
from oracle.static import DECODE_PROFILE_PROMPTS, validation_profile

KV_POLICIES = ("uniform", "static", "self_profile", "hindsight", "random")


def byte_shares(env: DRRLKVCacheEnv) -> np.ndarray:
    """``(K,)`` key bytes of a layer at each candidate over its full key bytes (the same for every layer)."""
    state = env._state  # noqa: SLF001 - the episode's prompt state
    return (state.layer_bytes / state.full_layer_bytes[:, None]).mean(axis=0)


def waterfill(env: DRRLKVCacheEnv, profile: np.ndarray) -> list[int]:
    """The water-fill of ``profile`` ``(L, K)`` at the episode's budget: a candidate index per layer."""
    return list(allocate_ranks(profile, byte_shares(env), env._budget.share))  # noqa: SLF001


def uniform_plan(env: DRRLKVCacheEnv) -> list[int]:
    """Every layer at the largest candidate whose share fits the budget."""
    shares = byte_shares(env)
    fitting = np.flatnonzero(shares <= env._budget.share + 1e-12)  # noqa: SLF001
    return [int(fitting.max()) if len(fitting) else 0] * env.num_layers


def static_profile(env: DRRLKVCacheEnv, progress: bool = False) -> np.ndarray:
    """``(L, K)`` the validation decode profile (cached on disk by ``oracle.static``)."""
    cfg = env.config
    corpus = DEFAULT_CORPUS if cfg.corpus in EVALUATION_ONLY else cfg.corpus
    max_tokens = cfg.context * DECODE_PROFILE_PROMPTS
    cost, _ = validation_profile(
        cfg.model, corpus, cfg.context, None, cfg.ranks, cfg.basis, cfg.device, max_tokens, progress, "decode"
    )
    return cost


def self_profile(env: DRRLKVCacheEnv) -> np.ndarray:
    """``(L, K)`` the prompt's own decode profile over its observed tokens (the teacher; causal)."""
    cfg, state = env.config, env._state  # noqa: SLF001
    prompt = state.prefix[:, : cfg.context]
    return decode_kl_profile(
        env.loaded, prompt, cfg.ranks, cfg.observe_tokens, cfg.basis,
        sink_tokens=cfg.sink_tokens, recent_tokens=cfg.recent_tokens,
    )  # fmt: skip


def hindsight_profile(env: DRRLKVCacheEnv) -> np.ndarray:
    """``(L, K)`` the decode profile of the scored tokens after the prefix (sees the scored text: a ceiling)."""
    cfg, state = env.config, env._state  # noqa: SLF001
    return decode_kl_profile(
        env.loaded, state.prefix, cfg.ranks, cfg.horizon, cfg.basis,
        sink_tokens=cfg.sink_tokens, recent_tokens=cfg.recent_tokens,
    )  # fmt: skip


KVPolicy = Callable[[DRRLKVCacheEnv, int], int]
"""``policy(env, layer)``: the candidate index for ``layer`` of the env's current episode"""


class PlannedPolicy:
    """A policy that plans the whole allocation at the first layer (``planner(env)``) and plays it."""

    def __init__(self, planner: Callable[[DRRLKVCacheEnv], list[int]]) -> None:
        self.planner, self.plan = planner, []

    def __call__(self, env: DRRLKVCacheEnv, layer: int) -> int:
        if layer == 0:
            self.plan = [int(index) for index in self.planner(env)]
        return self.plan[layer]


class RandomPolicy:
    """A seeded draw among the candidates the mask allows, layer by layer."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, env: DRRLKVCacheEnv, layer: int) -> int:
        return int(self.rng.choice(np.flatnonzero(env.action_masks())))


def kv_policy(name: str, seed: int = 0) -> KVPolicy:
    """The policy ``name`` (:data:`KV_POLICIES`)."""
    planners = {
        "uniform": uniform_plan,
        "static": lambda env: waterfill(env, static_profile(env)),
        "self_profile": lambda env: waterfill(env, self_profile(env)),
        "hindsight": lambda env: waterfill(env, hindsight_profile(env)),
    }
    if name == "random":
        return RandomPolicy(seed)
    if name not in planners:
        raise ValueError(f"KV-cache policy must be one of {KV_POLICIES}, got {name!r}")
    return PlannedPolicy(planners[name])


def play(env: DRRLKVCacheEnv, policy: KVPolicy) -> dict:
    """Play the env's current episode (after ``reset``) with ``policy``; the last step's info (``kl``, ``ranks``).

    A candidate the mask refuses plays the largest allowed below it (the env's rule).
    """
    info: dict = {}
    for layer in range(env.num_layers):
        _, _, terminated, _, info = env.step(policy(env, layer))
    assert terminated, "an episode of DRRL-KVCache-v0 has one step per layer"
    return info
