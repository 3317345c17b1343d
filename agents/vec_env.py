"""The native vector env (``drrl_env.vector``) as an SB3 ``VecEnv``: ``train_agent.py --vec batched``.

:class:`BatchedVecEnv` seeds episode ``k`` of env ``i`` with ``seed + i + k * n``, as ``EpisodeSeeds`` does for each
env of a ``DummyVecEnv`` (so ``--vec batched`` trains on the episodes ``--vec sync`` trains on), answers
``get_position``/``set_position`` for checkpoints and resume, and resets on the step that ends the episodes
(SB3's convention: the last observation in ``info["terminal_observation"]``). Wrap it in ``VecMonitor``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

from drrl_env.vector import DRRLAttentionVectorEnv


class BatchedVecEnv(VecEnv):
    """SB3's view of a :class:`~drrl_env.vector.DRRLAttentionVectorEnv`; ``seed`` is the run's base seed."""

    def __init__(self, vector: DRRLAttentionVectorEnv, seed: int) -> None:
        super().__init__(vector.num_envs, vector.single_observation_space, vector.single_action_space)
        self.vector, self.base_seed = vector, int(seed)
        self.episode, self.steps = 0, 0
        self._actions: np.ndarray | None = None

    def reset(self) -> VecEnvObs:
        seeds = [self.base_seed + i + self.episode * self.num_envs for i in range(self.num_envs)]
        observations, _ = self.vector.reset(seed=seeds)
        self.episode, self.steps = self.episode + 1, 0
        self.reset_infos = [dict(info) for info in self.vector.env_infos]
        self._reset_seeds()  # the episode index decides the seeds, as EpisodeSeeds does
        self._reset_options()
        return observations

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        observations, rewards, terminated, truncated, _ = self.vector.step(self._actions)
        self.steps += 1
        infos = [dict(info) for info in self.vector.env_infos]
        dones = terminated | truncated
        for i, info in enumerate(infos):
            info["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
            if dones[i]:
                info["terminal_observation"] = observations[i]
        if dones.any():  # every episode ends on the same step
            observations = self.reset()
        return observations, rewards.astype(np.float32), dones, infos

    def close(self) -> None:
        self.vector.close()

    def _targets(self, indices: VecEnvIndices) -> list[int]:
        if indices is None:
            return list(range(self.num_envs))
        return [int(indices)] if isinstance(indices, (int, np.integer)) else [int(i) for i in indices]

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return [getattr(self.vector.envs[i], attr_name) for i in self._targets(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        for i in self._targets(indices):
            setattr(self.vector.envs[i], attr_name, value)

    def env_method(
        self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any
    ) -> list:
        targets = self._targets(indices)
        if method_name == "get_position":  # EpisodeSeeds' (episodes started, Eq. 11 step, steps in the episode)
            return [(self.episode, self.vector.envs[i].guardrail_step, self.steps) for i in targets]
        if method_name == "set_position":
            episode, guardrail_step = method_args
            self.episode = int(episode)
            for i in targets:
                self.vector.envs[i].set_guardrail_step(guardrail_step)
            return [None] * len(targets)
        return [getattr(self.vector.envs[i], method_name)(*method_args, **method_kwargs) for i in targets]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False] * len(self._targets(indices))  # the episodes are not gym envs of their own: nothing wraps them

    def seed(self, seed: int | Sequence[int] | None = None) -> Sequence[None | int]:
        """Episode seeds come from the base seed and the episode index (``EpisodeSeeds``); a new base seed resets it."""
        if seed is not None:
            self.base_seed, self.episode = int(seed if isinstance(seed, (int, np.integer)) else seed[0]), 0
        return [None] * self.num_envs
