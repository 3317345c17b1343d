"""Every wrapper of the DRRL-Attention envs.

``RankOffsets``: actions as offsets from a fixed reference allocation, a residual policy's action space.
``StateHistory``: the observation as a window of the episode's last states (the Transformer policy's input).
``EpisodeSeeds``: episode ``k`` seeded ``base_seed + k * stride`` (a training run's seeding, resumable).
``MaskInObservation``: the mask inside a dict observation (RLlib).

RLlib (``ray.rllib.examples.rl_modules.classes.action_masking_rlm``), and other libraries that
have no ``action_masks()`` hook, expect the mask as part of the observation:
``{"observations": <the env's observation>, "action_mask": <float 0/1 per action logit>}``.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from drrl_env.guardrail import nearest_allowed

DEFAULT_HISTORY = 8
"""states the Transformer policy attends over (:class:`StateHistory`'s window)"""


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


class MaskInVectorObservation(gym.vector.VectorWrapper):
    """:class:`MaskInObservation` for the native vector env (``drrl_env.vector``): batched dict observations.

    Each env's mask comes from its info's ``action_mask``; an episode that has just ended carries an all-ones mask.
    """

    def __init__(self, env: gym.vector.VectorEnv) -> None:
        super().__init__(env)
        self.single_observation_space = mask_observation_space(env.single_observation_space, env.single_action_space)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, env.num_envs)

    def _with_masks(self, observations: np.ndarray, infos: dict[str, Any], ended: np.ndarray) -> dict[str, np.ndarray]:
        shape = (self.num_envs, *self.single_observation_space["action_mask"].shape)
        masks = np.asarray(infos["action_mask"], np.float32).reshape(shape).copy()
        masks[ended] = 1.0
        return {"action_mask": masks, "observations": observations}

    def reset(self, **kwargs: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        observations, infos = self.env.reset(**kwargs)
        return self._with_masks(observations, infos, np.zeros(self.num_envs, dtype=bool)), infos

    def step(self, actions: Any) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        observations, rewards, terminated, truncated, infos = self.env.step(actions)
        return self._with_masks(observations, infos, terminated | truncated), rewards, terminated, truncated, infos


DEFAULT_OFFSETS = (-2, -1, 0, 1, 2)
"""RankOffsets' actions: candidate steps below and above the reference rank (the default ranks: +-16)"""


class RankOffsets(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Actions are offsets, in candidate steps, from a reference allocation: a residual policy's action space.

    The reference is one candidate rank per layer: ``reference_ranks``, or the env's own
    (``EnvConfig.reference_ranks``, e.g. the static allocation of oracle.static at the episode's
    budget); the env must have one rank per layer (``per_head=False``). Action ``j`` of
    ``Discrete(len(offsets))`` plays candidate index ``reference_index[layer] + offsets[j]``, so
    the offset 0 at every step replays the reference, and a policy learns where this input should
    deviate from it (a residual policy; AMC-style budgets stay in force through the env's mask).
    ``action_masks()`` allows ``j`` iff its target exists and the env allows it; if the env allows
    none of the targets (the budget left cannot pay for any), every offset is allowed and each is
    played as the allowed candidate nearest its target (never a violation).

    The observation gains two entries after the env's: the reference's rank share ``r_ref / d`` at
    this step, and the budget surplus over the reference, ``share left - the reference's mean share
    over the remaining steps`` (0 while the episode has spent exactly what the reference has).
    Every method reads the step from the env itself, so a policy can also use an instance as a
    translator around an env that it does not step through (``observation``, ``action_masks``,
    ``action``).
    """

    def __init__(
        self, env: gym.Env, offsets: tuple[int, ...] = DEFAULT_OFFSETS, reference_ranks: tuple[int, ...] | None = None
    ) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, offsets=tuple(offsets), reference_ranks=reference_ranks)
        super().__init__(env)
        base = env.unwrapped
        cfg = base.config
        if reference_ranks is not None and (
            isinstance(reference_ranks, (str, bytes))
            or not all(isinstance(r, (int, np.integer)) and not isinstance(r, bool) for r in reference_ranks)
        ):
            raise ValueError(f"reference_ranks must be a sequence of integer ranks, got {reference_ranks!r}")
        reference = cfg.reference_ranks if reference_ranks is None else tuple(int(r) for r in reference_ranks)
        if reference is None or cfg.per_head:
            raise ValueError("RankOffsets needs reference_ranks (or an env with them) and per_head=False")
        if len(reference) != base.num_layers or not set(reference) <= set(cfg.ranks):
            raise ValueError(
                f"reference_ranks must be {base.num_layers} candidate ranks of {cfg.ranks}, got {list(reference)}"
            )
        whole = all(isinstance(o, (int, np.integer)) and not isinstance(o, bool) for o in offsets)
        bounded = whole and all(abs(int(o)) < len(cfg.ranks) for o in offsets)
        if not bounded or len(offsets) == 0 or len(set(offsets)) != len(offsets) or 0 not in offsets:
            raise ValueError(
                f"offsets must be distinct integers including 0, each within +-{len(cfg.ranks) - 1} candidates, "
                f"got {offsets!r}"
            )
        self.offsets = tuple(int(o) for o in offsets)
        self.reference_ranks = reference
        self.reference_index = np.array([cfg.ranks.index(r) for r in reference])  # (L,)
        layer_of_step = np.arange(len(base.step_pairs)) // base.num_segments
        share = np.asarray(reference, dtype=np.float64)[layer_of_step] / base.head_dim
        pairs = np.asarray(base.step_pairs, dtype=np.float64)
        tail = lambda x: np.cumsum(x[::-1])[::-1]  # noqa: E731  (sum over the remaining steps)
        self._reference_left = np.append(tail(pairs * share) / tail(pairs), 0.0)  # (steps + 1,)
        self._reference_share = np.append(share, 0.0)
        self._budget_left = base.observation_slices["budget"].start + 1
        self.action_space = spaces.Discrete(len(self.offsets))
        low, high = env.observation_space.low, env.observation_space.high
        self.observation_space = spaces.Box(
            np.append(low, [-1.0, -1.0]).astype(np.float32), np.append(high, [1.0, 1.0]).astype(np.float32)
        )

    def _step_index(self) -> int:
        """The env's current step (layer-major), or the number of steps once the episode has ended."""
        base = self.env.unwrapped
        try:
            call = base.attention_call
        except RuntimeError:
            return len(base.step_pairs)
        return call.layer * base.num_segments + call.segment

    def observation(self, observation: np.ndarray) -> np.ndarray:
        """The env's observation with the reference's rank share and the budget surplus over it appended."""
        t = self._step_index()
        surplus = float(observation[self._budget_left]) - self._reference_left[t]
        extra = np.clip([self._reference_share[t], surplus], -1.0, 1.0)
        return np.append(observation, extra).astype(np.float32)

    def _raw_targets(self) -> np.ndarray:
        """The candidate index each offset aims at in the current step (the last step's once the episode has ended)."""
        base = self.env.unwrapped
        layer = min(self._step_index(), len(base.step_pairs) - 1) // base.num_segments
        return self.reference_index[layer] + np.array(self.offsets)

    def action_masks(self) -> np.ndarray:
        base_mask = np.asarray(self.env.unwrapped.action_masks(), dtype=bool)
        raw, top = self._raw_targets(), len(base_mask) - 1
        mask = (raw >= 0) & (raw <= top) & base_mask[np.clip(raw, 0, top)]
        return mask if mask.any() else np.ones(len(self.offsets), dtype=bool)

    def action(self, action: Any) -> int:
        """The env's candidate index for offset action ``action`` (the nearest allowed one where it is masked)."""
        base = self.env.unwrapped
        targets = np.clip(self._raw_targets(), 0, len(base.config.ranks) - 1)
        target = int(targets[int(np.asarray(action).reshape(-1)[0])])
        return nearest_allowed(base.config.ranks[target], base.action_masks(), base.config.ranks)

    def reset(self, **kwargs: Any) -> tuple[np.ndarray, dict[str, Any]]:
        observation, info = self.env.reset(**kwargs)
        return self.observation(observation), info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        observation, reward, terminated, truncated, info = self.env.step(self.action(action))
        return self.observation(observation), reward, terminated, truncated, info


def stack_states(states: list[np.ndarray], window: int) -> np.ndarray:
    """The last ``window`` of ``states`` (each ``(D,)``, most recent last) as ``(window, D + 1)``, zero-padded.

    The last column is 1 for a real state, 0 for padding (at the top, before the first state).
    """
    recent = states[-window:]
    width = recent[0].shape[0]
    stacked = np.zeros((window, width + 1), dtype=np.float32)
    stacked[window - len(recent) :, :width] = np.stack(recent)
    stacked[window - len(recent) :, width] = 1.0
    return stacked


class StateHistory(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Observation wrapper: the last ``window`` states of the episode, ``Box(-10, 10, (window, D + 1))``.

    See :func:`stack_states`. ``action_masks()`` is passed through, so MaskablePPO works unchanged.
    """

    def __init__(self, env: gym.Env, window: int = DEFAULT_HISTORY) -> None:
        super().__init__(env)
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        gym.utils.RecordConstructorArgs.__init__(self, window=window)
        box = env.observation_space
        if not isinstance(box, spaces.Box) or len(box.shape) != 1:
            raise ValueError(f"StateHistory needs a 1-D Box observation space, got {box}")
        self.window = window
        low = np.concatenate([box.low, [0.0]]).astype(np.float32)
        high = np.concatenate([box.high, [1.0]]).astype(np.float32)
        self.observation_space = spaces.Box(np.tile(low, (window, 1)), np.tile(high, (window, 1)), dtype=np.float32)
        self._states: deque[np.ndarray] = deque(maxlen=window)

    def reset(self, **kwargs: Any) -> tuple[np.ndarray, dict]:
        observation, info = self.env.reset(**kwargs)
        self._states.clear()
        self._states.append(observation)
        return stack_states(list(self._states), self.window), info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        observation, reward, terminated, truncated, info = self.env.step(action)
        self._states.append(observation)
        return stack_states(list(self._states), self.window), reward, terminated, truncated, info

    def action_masks(self) -> np.ndarray:
        return self.env.get_wrapper_attr("action_masks")()


class EpisodeSeeds(gym.Wrapper):
    """Seeds episode ``k`` of this env with ``base_seed + k * stride``, whatever seed ``reset`` is given.

    With ``n`` envs, env ``i`` uses ``base_seed = seed + i`` and ``stride = n``: every episode of a
    run has its own seed, and a resumed run can restart at episode ``k`` (``set_position``).
    """

    def __init__(self, env: gym.Env, base_seed: int, stride: int = 1) -> None:
        super().__init__(env)
        self.base_seed, self.stride, self.episode, self.steps = base_seed, stride, 0, 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        del seed  # the episode index decides
        result = self.env.reset(seed=self.base_seed + self.episode * self.stride, options=options)
        self.episode, self.steps = self.episode + 1, 0
        return result

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.steps += 1
        return self.env.step(action)

    def get_position(self) -> tuple[int, int, int]:
        """(episodes started, the env's Eq. 11 guardrail step (0 in an env without one), steps in this episode)."""
        return self.episode, getattr(self.env.unwrapped, "guardrail_step", 0), self.steps

    def set_position(self, episode: int, guardrail_step: int) -> None:
        self.episode = episode
        if hasattr(self.env.unwrapped, "set_guardrail_step"):  # DRRL-KVCache-v0 has no guardrail
            self.env.unwrapped.set_guardrail_step(guardrail_step)
