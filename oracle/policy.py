"""Rank policies over DRRL-Attention-v0, and the greedy oracle (paper IV.E.3).

A *rank policy* is anything with ``name``, ``reset(seed)`` and ``act(observation, action_mask, env)``:
the observation and the boolean action mask are what a learned agent sees; ``env`` (the
unwrapped :class:`~drrl_env.env.DRRLAttentionEnv`) is there for policies that query its public
API, as the oracle does. Heuristic baselines and learned agents (``agents``) share this interface.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import numpy as np

from drrl_env.env import DRRLAttentionEnv
from drrl_env.guardrail import nearest_allowed_per_group


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
    reveals, is not part of the choice. In a ``per_head`` env it plays one candidate in every
    key/value group (what :meth:`DRRLAttentionEnv.candidate_rewards` scores; ``K`` joint choices,
    not ``K^Hkv``): the best one every group's mask allows, else each group's nearest allowed to the best.

    With ``lookahead = k > 0`` each allowed candidate is scored by its reward plus the rewards of
    the next ``k`` greedy steps after it (later layers see its low-rank output, the guardrail and
    the perturbation term see the transition). The env's state cannot be copied (the forward pass
    is paused in a thread), so this replays the episode's prefix in a scratch env of the same
    configuration, sharing the loaded model: about ``K * (t + k)`` extra env steps at step ``t``,
    meant for short episodes and small ``k``. The episode must be started with ``reset(seed)``
    and the env's ``reset(seed=seed)`` with the same seed (as :func:`oracle.dataset.run_episode` does).
    """

    def __init__(self, lookahead: int = 0) -> None:
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {lookahead}")
        self.lookahead = lookahead
        self._seed: int | None = None
        self._prefix: list[int] = []
        self._scratch: DRRLAttentionEnv | None = None

    @property
    def name(self) -> str:
        return "greedy" if not self.lookahead else f"greedy:lookahead={self.lookahead}"

    def reset(self, seed: int) -> None:
        self._seed, self._prefix = seed, []

    def act(self, observation: np.ndarray, action_mask: np.ndarray, env: DRRLAttentionEnv) -> int | np.ndarray:
        ranks = env.config.ranks
        group_masks = np.asarray(action_mask, dtype=bool).reshape(-1, len(ranks))  # (1 or Hkv, K)
        if env.config.per_head and self.lookahead:
            raise ValueError("GreedyOracle with lookahead needs one rank per layer (per_head=False)")
        allowed = group_masks.all(axis=0)
        if not allowed.any():  # the groups' masks share no candidate: score all, each group takes its nearest
            allowed = group_masks.any(axis=0)
        scores = np.where(allowed, env.candidate_rewards().reward, -np.inf)
        if self.lookahead:
            for candidate in np.flatnonzero(allowed):
                scores[candidate] = self._value_with_lookahead(env, int(candidate))
        choice = int(np.argmax(scores))
        self._prefix.append(choice)
        if not env.config.per_head:
            return choice
        return nearest_allowed_per_group(ranks[choice], action_mask, ranks)

    def _value_with_lookahead(self, env: DRRLAttentionEnv, candidate: int) -> float:
        """Reward of ``candidate`` now plus ``lookahead`` greedy rewards after it, replayed in the scratch env."""
        if self._seed is None:
            raise RuntimeError("GreedyOracle with lookahead: call reset(seed) with the episode's seed first")
        if self._scratch is None or self._scratch.config != env.config:
            import gymnasium as gym

            from drrl_env import ENV_ID

            self._scratch = gym.make(ENV_ID, **dataclasses.asdict(env.config)).unwrapped
        scratch = self._scratch
        scratch.reset(seed=self._seed, options={"guardrail_step": env.guardrail_step})  # the same eps_t
        for action in self._prefix:
            scratch.step(action)
        _, value, terminated, _, _ = scratch.step(candidate)
        for _ in range(self.lookahead):
            if terminated:
                break
            mask = scratch.action_masks()
            best = int(np.argmax(np.where(mask, scratch.candidate_rewards().reward, -np.inf)))
            _, reward, terminated, _, _ = scratch.step(best)
            value += reward
        return float(value)
