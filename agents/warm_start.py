"""The teacher of budgeted episodes: a hindsight-oracle dataset, built once per env configuration and cached.

``train_agent.py`` behaviour-clones it before reinforcement learning (``--warm-start hindsight``,
the default). The oracle is :class:`oracle.hindsight.HindsightOracle` with the Fisher estimate of
the layer KL profile (``hindsight:fisher``; :mod:`drrl_env.profiles.sensitivity`): the water-fill of the episode's
budget over what each layer's rank costs on this very input, label-free. The dataset lives under
``$DRRL_CACHE_DIR/datasets/`` in a folder named by a digest of the env configuration and the seed,
so a second run with the same options reuses it, and a run asking for more episodes extends it
(``oracle.record_trajectories`` resumes, and verifies every shard's checksum). Options that change
only the rewards (:data:`REWARD_OPTIONS`) are left out of the key: the dataset is recorded with
their defaults, since behaviour cloning reads only observations, masks and actions.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from drrl_env.config import EnvConfig
from drrl_env.lm.models import cache_dir
from drrl_env.profiles.kl import FISHER_SAMPLES
from oracle.dataset import record_trajectories
from oracle.hindsight import HindsightOracle

WARM_STARTS = ("hindsight", "hindsight:scaled_delta", "self_profile", "none")
"""--warm-start choices: the hindsight teacher by the Fisher profile, or by Eq. S (the agent's own
``sensitivity_estimate="scaled_delta"`` observation then shows the teacher's plan exactly), the self-profile
teacher of DRRL-KVCache-v0 (:func:`kv_teacher_dataset`), or none"""
KV_WARM_STARTS = ("self_profile", "none")
"""the --warm-start choices of DRRL-KVCache-v0"""
REWARD_OPTIONS = ("reward", "kl_shaping_weight", "kl_baseline", "kl_credit", "alpha", "beta", "gamma",
                  "violation_penalty", "terminal_lm_weight", "reference_ranks")  # fmt: skip
"""options that change only the rewards: the teacher's actions and observations do not depend on them, so its
dataset is recorded with their defaults and shared by runs that differ only in them"""


def teacher_env_kwargs(env_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``env_kwargs`` with the reward options at their defaults (see :data:`REWARD_OPTIONS`)."""
    defaults = EnvConfig()
    return {**env_kwargs, **{name: getattr(defaults, name) for name in REWARD_OPTIONS}}


TEACHER_SEED = 500_000
"""episode ``i`` of the teacher's dataset runs with seed ``TEACHER_SEED + i`` (train split)"""


def teacher_folder(env_kwargs: dict[str, Any], estimate: str = "fisher") -> Path:
    """The cache folder of the hindsight dataset for ``env_kwargs`` (the device is not part of the key)."""
    config = EnvConfig(**teacher_env_kwargs(env_kwargs))
    described = {key: value for key, value in vars(config).items() if key != "device"}
    key = {"oracle": f"hindsight:{estimate}", "seed": TEACHER_SEED, **described}
    text = json.dumps(key, sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return cache_dir() / "datasets" / f"hindsight-{estimate}-{digest}"


def teacher_estimate(warm_start: str) -> str:
    """The profile estimate of a --warm-start choice's teacher: ``hindsight`` -> 'fisher', ``hindsight:E`` -> E."""
    teachers = tuple(choice for choice in WARM_STARTS if choice.startswith("hindsight"))
    if warm_start not in teachers:
        raise ValueError(f"warm start must be one of {teachers} to have a teacher, got {warm_start!r}")
    return warm_start.partition(":")[2] or "fisher"


def hindsight_teacher_dataset(
    env_kwargs: dict[str, Any], episodes: int, estimate: str = "fisher", progress: bool = True
) -> Path:
    """Build (or reuse, or extend) the hindsight-oracle dataset of ``episodes`` episodes for ``env_kwargs``.

    The teacher is ``HindsightOracle(estimate)``; a 'scaled_delta' teacher fits its scale with the env's
    ``sensitivity_samples`` (16 without them), so that it reuses the profile the env shows.
    """
    folder = teacher_folder(env_kwargs, estimate)
    kwargs = teacher_env_kwargs(env_kwargs)
    samples = (kwargs.get("sensitivity_samples") or FISHER_SAMPLES) if estimate == "scaled_delta" else FISHER_SAMPLES
    teacher = HindsightOracle(estimate, samples)
    if progress:
        print(f"warm start: {episodes} episodes of the teacher {teacher.name} (cached in {folder})")
    record_trajectories(folder, teacher, episodes, kwargs, TEACHER_SEED, progress=progress)
    return folder


def kv_teacher_dataset(env_kwargs: dict[str, Any], episodes: int, progress: bool = True) -> Path:
    """Build (or reuse, or extend) the self-profile teacher's dataset of DRRL-KVCache-v0 for ``env_kwargs``.

    The teacher (``oracle.kvcache``'s ``self_profile``) water-fills each episode's budget over the prompt's own
    decode profile over its observed tokens: causal, so an agent shown the cheap statistics of the same tokens can
    in principle learn it. Every prompt of the pool is kept (``cached_prompts = prompts``) and its profile measured
    once, so the dataset costs a prompt's precomputation and profile per prompt, not per episode. Cached under
    ``$DRRL_CACHE_DIR/datasets/`` by a digest of the env configuration (not the device or ``cached_prompts``).
    """
    from drrl_env.kvcache import KVCACHE_ENV_ID, KVCacheConfig
    from oracle.kvcache import kv_policy

    kwargs = {**env_kwargs, "cached_prompts": env_kwargs["prompts"]}
    config = KVCacheConfig(**kwargs)
    described = {key: value for key, value in vars(config).items() if key not in ("device", "cached_prompts")}
    text = json.dumps({"oracle": "self_profile", "seed": TEACHER_SEED, **described}, sort_keys=True, default=str)
    folder = cache_dir() / "datasets" / f"kv-self_profile-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    if progress:
        print(f"warm start: {episodes} episodes of the self-profile teacher (cached in {folder})")
    record_trajectories(folder, kv_policy("self_profile"), episodes, kwargs, TEACHER_SEED, progress=progress,
                        env_id=KVCACHE_ENV_ID)  # fmt: skip
    return folder


def scale_action_logits(policy: torch.nn.Module, temperature: float) -> None:
    """Divide an actor-critic policy's action logits by ``temperature``: its action head's weight and bias.

    The argmax of every (masked) distribution is unchanged; below 1 its samples are sharper, above 1 flatter.
    """
    head = getattr(policy, "action_net", None)
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"{type(policy).__name__} has no linear action head (action_net) to scale")
    with torch.no_grad():
        head.weight /= temperature
        head.bias /= temperature
