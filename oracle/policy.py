"""Rank policies over DRRL-Attention-v0, and the greedy oracle (paper IV.E.3).

A *rank policy* is anything with ``name``, ``reset(seed)`` and ``act(observation, action_mask, env)``:
the observation and the boolean action mask are what a learned agent sees; ``env`` (the
unwrapped :class:`~drrl_env.env.DRRLAttentionEnv`) is there for policies that query its public
API, as the oracle does. Heuristic baselines and learned agents (``agents``) share this interface.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from drrl_env.env import DRRLAttentionEnv


@runtime_checkable
class RankPolicy(Protocol):
    """A policy that picks a rank index (an action of the env) for the current step."""

    name: str
    """a short id, stored with the trajectories it produces (e.g. ``greedy``, ``fixed:32``)"""

    def reset(self, seed: int) -> None:
        """Start an episode; a stochastic policy reseeds its generator here."""

    def act(self, observation: np.ndarray, action_mask: np.ndarray, env: DRRLAttentionEnv) -> Any:
        """The action for the current step (it should be allowed by ``action_mask``)."""


class GreedyOracle:
    """The greedy oracle: at each step, the allowed rank with the highest Eq. 13 reward.

    All ``K`` candidate ranks of a step are scored in one batched low-rank attention pass
    (:meth:`DRRLAttentionEnv.candidate_rewards`), so a step of the oracle costs one layer of the
    LM plus ``K`` attention evaluations that share one set of spectra, not ``K`` forwards. Ties go
    to the lower rank (cheaper). The terminal LM-loss reward, which only the end of the episode
    reveals, is not part of the greedy choice. Supports ``per_head=False`` (one rank per layer).
    """

    name = "greedy"

    def reset(self, seed: int) -> None:  # deterministic: nothing to reseed
        del seed

    def act(self, observation: np.ndarray, action_mask: np.ndarray, env: DRRLAttentionEnv) -> int:
        if env.config.per_head:
            raise ValueError(
                "GreedyOracle supports per_head=False only: with per_head the action space is K^Hkv joint ranks"
            )
        candidates = env.candidate_rewards()
        scores = np.where(np.asarray(action_mask, dtype=bool), candidates.reward, -np.inf)
        return int(np.argmax(scores))
