"""``MaskInObservation``: the env with its action mask inside the observation, the layout RLlib's masking module reads.

RLlib (``ray.rllib.examples.rl_modules.classes.action_masking_rlm``), and other libraries that
have no ``action_masks()`` hook, expect the mask as part of the observation:
``{"observations": <the env's observation>, "action_mask": <float 0/1 per action logit>}``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces


def action_logits(action_space: spaces.Space) -> int:
    """How many logits a policy over ``action_space`` has: ``n``, or the sum of ``nvec`` (one block per sub-action)."""
    if isinstance(action_space, spaces.Discrete):
        return int(action_space.n)
    if isinstance(action_space, spaces.MultiDiscrete):
        return int(action_space.nvec.sum())
    raise TypeError(f"an action mask needs a Discrete or MultiDiscrete action space, got {action_space}")


def mask_observation_space(observation_space: spaces.Space, action_space: spaces.Space) -> spaces.Dict:
    """The observation space of :class:`MaskInObservation`: ``Dict(action_mask=Box(0, 1, (logits,)), observations)``."""
    mask = spaces.Box(0.0, 1.0, (action_logits(action_space),), dtype=np.float32)
    return spaces.Dict({"action_mask": mask, "observations": observation_space})


class MaskInObservation(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Observations become ``{"observations": obs, "action_mask": mask}``; the mask is ``action_masks()`` as float32.

    The mask has one entry per action logit: ``(K,)`` for one rank per layer, ``(Hkv * K,)``
    group-major with ``per_head`` (the concatenated logits of a MultiDiscrete action). The
    terminal observation, after which no action is taken, carries an all-ones mask so that its
    action distribution stays defined. ``action_masks()`` still works, for sb3-contrib.
    """

    def __init__(self, env: gym.Env) -> None:
        gym.utils.RecordConstructorArgs.__init__(self)
        super().__init__(env)
        self.observation_space = mask_observation_space(env.observation_space, env.action_space)

    def _with_mask(self, observation: Any, info: dict[str, Any], terminated: bool) -> dict[str, np.ndarray]:
        shape = self.observation_space["action_mask"].shape
        mask = np.ones(shape, np.float32) if terminated else np.asarray(info["action_mask"], np.float32)
        return {"action_mask": mask.reshape(shape), "observations": observation}

    def reset(self, **kwargs: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        observation, info = self.env.reset(**kwargs)
        return self._with_mask(observation, info, False), info

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        observation, reward, terminated, truncated, info = self.env.step(action)
        return self._with_mask(observation, info, terminated or truncated), reward, terminated, truncated, info

    def action_masks(self) -> np.ndarray:
        return self.env.unwrapped.action_masks()
