"""The rank-selection env as a native vector env: N episodes through one batched forward pass of the LM.

``gym.make_vec("DRRL-Attention-v0", num_envs=N, vectorization_mode="vector_entry_point")`` (every registered id)
gives a :class:`DRRLAttentionVectorEnv`. Each of its N episodes keeps what a single env's episode has (its batch,
budget, ranks, masks, observation, reward), but the model's layers run once over the N batches stacked
(``N * batch_size`` rows): at every attention call each episode gets its own rows, chooses their ranks, and the
N outputs continue the one forward pass. The spectra of the whole stack are one batched ``eigh``; each
episode's are slices of it. An episode always has ``layers x segments`` steps, so the N episodes run in
lockstep and end on the same step; the step after the end resets them all (Gymnasium's ``NEXT_STEP`` autoreset).

Same seeds, same episodes: env ``i`` of ``reset(seed=s)`` draws what a single env draws with ``reset(seed=s + i)``,
and its observations, masks and rewards are those of the single env up to the rounding of a batched matrix
product (tests/drrl_env/test_vector.py). ``agents.vec_env`` adapts it to SB3's ``VecEnv``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from drrl_env.attention.hook import AttentionCall
from drrl_env.env import DRRLAttentionEnv
from drrl_env.episode import ReferencePass
from drrl_env.lm.runner import SteppedForward


class _Rows:
    """An episode's rows of the shared forward pass: what its :class:`~drrl_env.episode.Episode` calls its runner."""

    def __init__(self, first_call: AttentionCall) -> None:
        self._first_call = first_call
        self.logits: torch.Tensor | None = None  # the episode's rows of the logits, set when the pass ends

    def start(self) -> AttentionCall:
        return self._first_call

    def send(self, output: torch.Tensor) -> AttentionCall | None:
        raise RuntimeError("an episode of a vector env is stepped by DRRLAttentionVectorEnv.step, not on its own")

    def abort(self) -> None:  # the vector env aborts the shared pass
        pass


class DRRLAttentionVectorEnv(VectorEnv):
    """``num_envs`` episodes of ``DRRLAttentionEnv(**kwargs)`` stepped through one batched forward pass.

    ``envs`` are the N single envs whose episodes it runs (their ``action_masks()``, ``episode_record()`` and
    properties work as usual; do not step them directly). ``call(name)`` calls a method or reads an attribute
    of each, as ``SyncVectorEnv.call`` does.
    """

    metadata: dict[str, Any] = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(self, num_envs: int = 1, **kwargs: Any) -> None:
        if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}")
        if kwargs.get("render_mode") is not None:
            raise ValueError("a vector env renders nothing: render each of its .envs instead")
        kwargs.pop("render_mode", None)
        self.envs = [DRRLAttentionEnv(**kwargs) for _ in range(int(num_envs))]  # one model per process: shared
        first = self.envs[0]
        self.num_envs = int(num_envs)
        self.config = first.config
        self.single_observation_space, self.single_action_space = first.observation_space, first.action_space
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.render_mode = None
        self._forward: SteppedForward | None = None
        self._ended = False
        self.env_infos: list[dict[str, Any]] = [{} for _ in self.envs]
        """each env's own info of the last reset or step (what ``infos`` holds stacked), for per-env consumers"""

    # ----------------------------------------------------------------- gym API
    def reset(
        self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start N episodes: env ``i`` seeded ``seed + i`` (a list: one seed each); ``options`` go to every env."""
        if seed is None or isinstance(seed, (int, np.integer)):
            seeds = [None if seed is None else int(seed) + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"reset seed must be an int, None or {self.num_envs} seeds, got {len(seeds)}")
        self._stop()
        drawn = [env._draw(s, options) for env, s in zip(self.envs, seeds, strict=True)]
        first, rows = self.envs[0], self.config.batch_size
        stacked = torch.cat([start.batch for start in drawn])
        segment_len = self.config.segment_len
        reference = ReferencePass.run(first.loaded, first.hook, stacked, segment_len) if first.needs_reference else None
        self._forward = SteppedForward(
            first.loaded.model, first.hook, stacked, segment_len, keep_logits=reference is not None
        )
        parts = self._split(self._forward.start())
        observations, infos = [], {}
        for i, (env, start, part) in enumerate(zip(self.envs, drawn, parts, strict=True)):
            own_reference = None if reference is None else reference.rows(i * rows, (i + 1) * rows)
            observation, info = env._begin(start, own_reference, _Rows(part))
            observations.append(observation)
            self.env_infos[i] = info
            infos = self._add_info(infos, info, i)
        self._ended = False
        return np.stack(observations), infos

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """One step of every episode; after the step that ended them, the next ``step`` resets them all."""
        if self._ended:  # NEXT_STEP autoreset: the actions are ignored, the episodes start anew
            observations, infos = self.reset()
            zeros = np.zeros(self.num_envs, dtype=bool)
            return observations, np.zeros(self.num_envs), zeros, zeros.copy(), infos
        actions = list(actions)
        if len(actions) != self.num_envs:
            raise ValueError(f"step needs {self.num_envs} actions (one per env), got {len(actions)}")
        episodes = [env._require_episode("step()") for env in self.envs]
        requested = [env._requested(action) for env, action in zip(self.envs, actions, strict=True)]
        outputs = [episode.decide(r) for episode, r in zip(episodes, requested, strict=True)]
        next_call = self._forward.send(torch.cat(outputs))
        parts = self._split(next_call)
        if next_call is None:  # the pass has finished: each episode's rows of the logits
            logits, rows = self._forward.logits, self.config.batch_size
            for i, episode in enumerate(episodes):
                episode.runner.logits = None if logits is None else logits[i * rows : (i + 1) * rows]
            self._forward.logits = None
        observations, rewards, terminated, truncated, infos = [], [], [], [], {}
        for i, (env, episode, part) in enumerate(zip(self.envs, episodes, parts, strict=True)):
            observation, reward, ended, cut, info = env._stepped(episode.complete(part))
            self.env_infos[i] = info
            observations.append(observation)
            rewards.append(reward)
            terminated.append(ended)
            truncated.append(cut)
            infos = self._add_info(infos, info, i)
        self._ended = bool(terminated[0])
        return (
            np.stack(observations),
            np.asarray(rewards, dtype=np.float64),
            np.asarray(terminated, dtype=bool),
            np.asarray(truncated, dtype=bool),
            infos,
        )

    def action_masks(self) -> np.ndarray:
        """Each episode's mask of allowed actions, stacked: ``(N, K)`` or ``(N, Hkv * K)``."""
        return np.stack([env.action_masks() for env in self.envs])

    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """Call method ``name`` of each single env (or read the attribute), as ``SyncVectorEnv.call`` does."""
        results = []
        for env in self.envs:
            attribute = getattr(env, name)
            results.append(attribute(*args, **kwargs) if callable(attribute) else attribute)
        return tuple(results)

    def close_extras(self, **kwargs: Any) -> None:
        self._stop()
        for env in self.envs:
            env.close()

    # ----------------------------------------------------------------- internals
    def _split(self, call: AttentionCall | None) -> list[AttentionCall | None]:
        """Each episode's rows of ``call``, with the stack's spectra computed once for all of them."""
        if call is None:
            return [None] * self.num_envs
        if self.config.spectral_mode != "calibrated":  # the spectra every step and observation reads: one eigh
            call.query_spectrum, call.key_spectrum  # noqa: B018 - cached properties, computed here for the stack
            if self.config.spectral_mode == "joint":
                call.logit_core  # noqa: B018
        rows = self.config.batch_size
        return [call.rows(i * rows, (i + 1) * rows) for i in range(self.num_envs)]

    def _stop(self) -> None:
        if self._forward is not None:
            self._forward.abort()
            self._forward = None
