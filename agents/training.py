"""Training plumbing for train_agent.py: seeded vector envs and TensorBoard callbacks.

Episodes are seeded by index (:class:`EpisodeSeeds`), and Eq. 11's guardrail step follows the
training step count (:class:`GuardrailScheduleCallback`); both are part of an env's position,
which checkpoints (:mod:`agents.checkpoints`) store so that a resumed run replays exactly the
episodes of an uninterrupted one.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import HParam, Image
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv, VecMonitor

from agents.networks import PolicySetup
from agents.vec_env import BatchedVecEnv
from drrl_env import ENV_ID
from drrl_env.kvcache import KVCACHE_ENV_ID
from drrl_env.render import rank_heatmap_rgb
from drrl_env.wrappers import EpisodeSeeds


class GuardrailScheduleCallback(BaseCallback):
    """Eq. 11's clock: sets every env's ``guardrail_step`` to the training step count at each rollout's start.

    The annealed threshold ``eps_t`` is training state, so the trainer owns ``t``; the envs only
    read it (``set_guardrail_step``), which keeps one seed one episode.
    """

    def _on_rollout_start(self) -> None:
        self.training_env.env_method("set_guardrail_step", int(self.num_timesteps))

    def _on_step(self) -> bool:
        return True


CRITIC_PREFIXES = ("mlp_extractor.value_net.", "value_net.")
"""parameter names of an SB3 actor-critic policy's critic (its own MLP and head; ``share_features_extractor``
policies share only the extractor, which stays frozen with the actor)"""


class ValueWarmupCallback(BaseCallback):
    """Critic warm-up: the first ``steps`` env steps train the value function only, the actor stays as it started.

    A policy warm-started by behaviour cloning comes with a random critic, and PPO's first advantages are then
    noise that moves the cloned actor (PIRLNav, Ramrakhya et al. 2023, fine-tune BC policies this way). Every
    update whose rollout began before ``steps`` has every parameter but the critic's frozen
    (``requires_grad=False``: no gradient, so the optimizer leaves it and its moments alone); later updates train
    all. Decided from ``num_timesteps`` at each rollout's start, so a resumed run warms up exactly as an
    uninterrupted one.
    """

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps

    def _on_training_start(self) -> None:
        names = [name for name, _ in self.model.policy.named_parameters()]
        if not any(name.startswith(CRITIC_PREFIXES) for name in names):
            raise ValueError(f"--value-warmup-steps: {type(self.model.policy).__name__} has no separate critic")

    def _on_rollout_start(self) -> None:
        warming = self.num_timesteps < self.steps
        for name, parameter in self.model.policy.named_parameters():
            parameter.requires_grad_(not warming or name.startswith(CRITIC_PREFIXES))

    def _on_step(self) -> bool:
        return True


def make_vec_env(
    env_kwargs: dict[str, Any], setup: PolicySetup, n_envs: int, seed: int, vec: str = "auto", env_id: str = ENV_ID
) -> VecEnv:
    """``n_envs`` seeded ``env_id`` envs, wrapped for the policy and monitored, in one vector env.

    ``vec``: ``sync`` (DummyVecEnv), ``subproc`` (SubprocVecEnv), ``batched`` (the env's native vector env,
    :class:`agents.vec_env.BatchedVecEnv`, on the same episode seeds), or ``auto`` (``batched`` for more than one
    env when the policy wraps no env, else ``sync``).

    Each subprocess of a SubprocVecEnv gets ``cpu_count // n_envs`` torch threads (at least one): with torch's
    default, every core in every process, the processes contend for the cores (benchmarks/scaling.py).

    Raises:
        ValueError: an unknown ``vec``, or ``batched`` with a policy that wraps each env (transformer, residual).
    """
    wrapped = bool(setup.history) or setup.offsets is not None
    native = env_id != KVCACHE_ENV_ID  # the DRRL-Attention ids have a vector env
    if vec == "auto":
        vec = "batched" if n_envs > 1 and not wrapped and native else "sync"
    if vec == "batched" and not native:
        raise ValueError(f"--vec batched: {env_id} has no native vector env; use --vec sync or subproc")
    if vec == "batched":
        if wrapped:
            raise ValueError(
                f"--vec batched runs the episodes without per-env wrappers; the {setup.name} network"
                f"{' (residual)' if setup.offsets is not None else ''} needs them: use --vec sync"
            )
        vector = gym.make_vec(env_id, num_envs=n_envs, vectorization_mode="vector_entry_point", **env_kwargs)
        return VecMonitor(BatchedVecEnv(vector, seed))

    def factory(index: int):
        def make() -> gym.Env:
            if vec == "subproc":
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // n_envs))
            env = EpisodeSeeds(gym.make(env_id, **env_kwargs), seed + index, n_envs)
            return Monitor(setup.wrap(env))

        return make

    if vec not in ("sync", "subproc"):
        raise ValueError(f"vec must be 'sync', 'subproc' or 'batched', got {vec!r}")
    factories = [factory(i) for i in range(n_envs)]
    return DummyVecEnv(factories) if vec == "sync" else SubprocVecEnv(factories, start_method="spawn")


def step_metrics(info: dict[str, Any]) -> dict[str, float]:
    """The ``drrl/`` scalars of one env step's ``info`` (empty for a reset's): reward terms, FLOPs, masks, fidelity.

    Both training backends log their means over each rollout: SB3 through
    :class:`RankLoggingCallback`, RLlib through ``agents.rllib``'s env-runner callback.
    """
    if "reward_terms" not in info:
        return {}
    metrics = {f"reward_terms/{term}": float(value) for term, value in info["reward_terms"].items()}
    if "flops" in info:  # the DRRL-Attention ids; DRRL-KVCache-v0 reports the key cache used instead
        metrics["flops_saved"] = 1.0 - info["flops"] / info["flops_full"]
        metrics["flops_logits_ratio"] = info["flops_logits"] / info["flops_logits_full"]
    for name in (
        "guardrail_mask_rate",
        "budget_mask_rate",
        "kl",
        "kl_waterfill",
        "credit_forwards",
        "fidelity",
        "perturbation",
    ):
        if name in info:
            metrics[name] = float(info[name])
    metrics["violation_rate"] = float(info["masked_violation"])
    if "mask_before" in info:
        metrics["mask_rate"] = 1.0 - float(np.mean(info["mask_before"]))  # the mask this step faced
    return metrics


def rank_heatmap(cells: dict[tuple[int, int], float]) -> np.ndarray:
    """The mean rank per (layer, segment) as a layers x segments heatmap image (HWC, uint8); missing cells blank."""
    layers = 1 + max(layer for layer, _ in cells)
    segments = 1 + max(segment for _, segment in cells)
    grid = np.full((layers, segments), np.nan)
    for (layer, segment), value in cells.items():
        grid[layer, segment] = value
    return rank_heatmap_rgb(grid, np.nanmin(grid), np.nanmax(grid), (12, 48))


class RankLoggingCallback(BaseCallback):
    """TensorBoard: reward terms, FLOPs saved, fidelity, mask and violation rates, ranks per layer; evaluation PPL.

    Scalars are means over each rollout under ``drrl/``; the ranks go out as a histogram and as a
    layers x segments heatmap image. With ``evaluate`` (a function of the model returning
    ``{"ppl": ..., ...}``) and ``eval_every``, those numbers are logged under ``eval/``.
    """

    def __init__(self, hparams: dict[str, Any], evaluate=None, eval_every: int = 0) -> None:
        super().__init__()
        self.hparams, self.evaluate, self.eval_every = hparams, evaluate, eval_every
        self._values: dict[str, list[float]] = defaultdict(list)
        self._ranks: dict[tuple[int, int], list[float]] = defaultdict(list)
        self._next_eval = eval_every

    def _on_training_start(self) -> None:
        hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in self.hparams.items()}
        self.logger.record(
            "hparams",
            HParam(hparams, {"rollout/ep_rew_mean": 0.0, "eval/ppl": 0.0}),
            exclude=("stdout", "log", "json", "csv"),
        )
        if self.eval_every:
            self._next_eval = (self.num_timesteps // self.eval_every + 1) * self.eval_every

    def _on_step(self) -> bool:
        for info in self.locals.get("infos", []):
            for name, value in step_metrics(info).items():
                self._values[name].append(value)
            if "rank" in info:
                self._ranks[(info["layer"], info.get("segment", 0))].append(float(np.mean(info["rank"])))
        return True

    def _on_rollout_end(self) -> None:
        for name, values in self._values.items():
            self.logger.record(f"drrl/{name}", float(np.mean(values)))
        if self._ranks:
            all_ranks = torch.tensor([r for values in self._ranks.values() for r in values])
            self.logger.record("drrl/rank_histogram", all_ranks, exclude=("stdout", "log", "json", "csv"))
            cells = {cell: float(np.mean(values)) for cell, values in self._ranks.items()}
            self.logger.record(
                "drrl/rank_heatmap", Image(rank_heatmap(cells), "HWC"), exclude=("stdout", "log", "json", "csv")
            )
        self._values.clear()
        self._ranks.clear()
        if self.evaluate is not None and self.eval_every and self.num_timesteps >= self._next_eval:
            for name, value in self.evaluate(self.model).items():
                self.logger.record(f"eval/{name}", value)
            self._next_eval = (self.num_timesteps // self.eval_every + 1) * self.eval_every
