"""Trajectory datasets of rank policies: HF ``datasets`` parquet shards on disk, resumable.

Layout of a dataset folder ``DIR``::

    DIR/metadata.json            env config, policy, seed, shard size, episodes written
    DIR/checksums.json           SHA-256 of metadata.json and of every shard, recorded when written
    DIR/data/shard-00000.parquet episodes 0 .. episodes_per_shard - 1, one row per env step
    ...

Load it with :func:`load_trajectories` (a ``datasets.Dataset``), or with plain
``datasets.load_dataset("parquet", data_dir=DIR + "/data", split="train")``.

Episode ``i`` always runs with seed ``seed + i`` (the env's ``reset`` and the policy's), and the
env's guardrail clock is set to ``i * steps_per_episode`` before it, so a run that is interrupted
and resumed writes exactly the rows of an uninterrupted run. Each shard and the metadata are
written to a temporary file and renamed into place: an interrupted run never leaves a partial
shard, and resuming recomputes at most the one shard it was writing (and deletes the temporary
files a kill left). Resuming also recomputes any shard that no longer matches its checksum;
loading refuses one (:class:`DatasetCorruptError`, naming the file), so nothing trains on a
shard that changed after it was written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import gymnasium as gym
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from drrl_env import ENV_ID
from drrl_env.cli import config_class
from drrl_env.kvcache import KVCacheConfig
from drrl_env.lm.files import (
    ChecksumLedger,
    check_output_folder,
    remove_stale_temporaries,
    write_atomic,
    write_text_atomic,
)
from oracle.policy import RankPolicy

FORMAT = "drrl-trajectories"
VERSION = 1
METADATA_FILE = "metadata.json"
CHECKSUMS_FILE = "checksums.json"
DATA_DIR = "data"
REWARD_TERMS = ("fidelity", "flops", "perturbation", "shaping", "violation", "terminal")
"""reward terms recorded per step: Eq. 13's three (reward 'eq13') or the shaping term (reward 'kl'), and the
violation and terminal terms of both; a term the reward does not have is recorded as 0"""


class DatasetMismatchError(ValueError):
    """``DIR`` already holds trajectories made with another env configuration, policy or seed."""


class DatasetCorruptError(ValueError):
    """A file of a dataset is unreadable, or differs from the checksum recorded when it was written."""


def trajectory_features(observation_size: int, groups: int | None = None) -> datasets.Features:
    """Columns of a trajectory dataset (one row per env step).

    ``prompt`` is the episode's prompt in an env with a pool of prompts (DRRL-KVCache-v0's ``prompt_index``), -1
    in one without; datasets written before it existed lack the column (and keep lacking it when resumed).

    ``groups``: with per-head ranks (``per_head=True``), the key/value groups: ``action`` and ``rank`` are then
    a sequence of that length (the MultiDiscrete action and the rank each group ran at); None: one integer each.
    """
    value = datasets.Value
    per_step = value("int64") if groups is None else datasets.Sequence(value("int64"), length=groups)
    columns = {
        "observation": datasets.Sequence(value("float32"), length=observation_size),
        "action": per_step,
        "rank": per_step,
        "action_mask": datasets.Sequence(value("bool")),
        "reward": value("float64"),
        **{f"reward_{term}": value("float64") for term in REWARD_TERMS},
        "fidelity": value("float64"),
        "flops_ratio": value("float64"),
        "perturbation": value("float64"),
        "layer": value("int32"),
        "segment": value("int32"),
        "step": value("int32"),
        "episode": value("int64"),
        "seed": value("int64"),
        "prompt": value("int64"),
    }
    return datasets.Features(columns)


def dataset_metadata(
    config: Any, policy: str, seed: int, episodes_per_shard: int, env_id: str = ENV_ID
) -> dict[str, Any]:
    """What identifies a trajectory dataset: rows of two runs with equal metadata are equal.

    ``config``: the env's config (``EnvConfig``, or ``KVCacheConfig`` for ``env_id`` DRRL-KVCache-v0).
    """
    env_config = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
    return {
        "format": FORMAT,
        "version": VERSION,
        "env_id": env_id,
        "env_config": env_config,
        "policy": policy,
        "seed": seed,
        "episodes_per_shard": episodes_per_shard,
    }


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The metadata of the dataset in ``directory``; one-line errors name the folder or the file.

    Raises:
        FileNotFoundError: ``directory`` holds no dataset.
        DatasetCorruptError: ``metadata.json`` is not a JSON object, or not a drrl dataset's.
    """
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} holds no trajectory dataset (no {METADATA_FILE}); make one with python -m oracle"
        )
    try:
        metadata = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DatasetCorruptError(
            f"{path} is unreadable ({error}); it may be truncated: rerun the command that made the dataset "
            "into a new folder"
        ) from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else type(metadata).__name__
        raise DatasetCorruptError(f"{path} is not a drrl trajectory dataset's metadata (format {found!r})")
    return metadata


def env_config_of(metadata: dict[str, Any]) -> dict[str, Any]:
    """The ``gym.make`` keywords of the env a dataset was recorded with (``env_id_of_dataset`` names the env)."""
    config = dict(metadata["env_config"])
    config["ranks"] = tuple(config["ranks"])
    for name in ("flops_budget", "cache_budget"):
        if isinstance(config.get(name), list):
            config[name] = tuple(config[name])
    return config


def env_id_of_dataset(metadata: dict[str, Any]) -> str:
    """The registered id of the env a dataset was recorded in."""
    return metadata.get("env_id", ENV_ID)


OBSERVATION_FIELDS = (
    "model", "ranks", "per_head", "spectral_mode", "segment_len", "sensitivity_samples", "sensitivity_estimate"
)  # fmt: skip
"""env options that decide what an observation says and which action is which rank: a policy cloned from a dataset
acts in an env that agrees with the dataset's on each of them"""
KV_OBSERVATION_FIELDS = (
    "model",
    "ranks",
    "basis",
    "observe_tokens",
    "sink_tokens",
    "recent_tokens",
    "static_prior",
    "attention_kl",
)
"""the same for DRRL-KVCache-v0"""


def check_dataset_fits_env(directory: str | os.PathLike, env_kwargs: dict[str, Any], option: str) -> None:
    """Refuse a dataset recorded in an env that ``env_kwargs`` contradicts on an :data:`OBSERVATION_FIELDS` option.

    A field a dataset lacks (an older drrl) has the env's default. ``option`` names the command's option that gave
    the dataset, for the message.

    Raises:
        DatasetMismatchError: naming each differing option with the dataset's value and the one given here.
    """
    metadata = read_metadata(directory)
    env_id = env_id_of_dataset(metadata)
    cls = config_class(env_id)
    defaults = {field.name: field.default for field in dataclasses.fields(cls)}
    stored = {**defaults, **metadata["env_config"]}
    wanted = {**defaults, **env_kwargs}
    if set(env_kwargs) - set(defaults):
        raise DatasetMismatchError(f"{option} {directory} was recorded in {env_id}, not in the env given here")
    fields = KV_OBSERVATION_FIELDS if cls is KVCacheConfig else OBSERVATION_FIELDS

    def same(value: Any) -> Any:
        return list(value) if isinstance(value, (list, tuple)) else value

    differing = [name for name in fields if same(stored[name]) != same(wanted[name])]
    if differing:
        details = "; ".join(f"--{n.replace('_', '-')}: dataset {stored[n]!r}, here {wanted[n]!r}" for n in differing)
        raise DatasetMismatchError(
            f"{option} {directory} was recorded in another env ({details}): a policy cloned from it would misread "
            "this env's observations; pass the dataset's values, or record a dataset with these options"
        )


def _shard_path(directory: Path, index: int) -> Path:
    return directory / DATA_DIR / f"shard-{index:05d}.parquet"


def shard_files(directory: str | os.PathLike) -> list[Path]:
    """The complete shards of a dataset, in order."""
    return sorted((Path(directory) / DATA_DIR).glob("shard-*.parquet"))


def _corrupt(path: Path, problem: str) -> DatasetCorruptError:
    return DatasetCorruptError(
        f"{path} {problem}: do not train on it; rerun the command that made the dataset with the same options "
        "to recompute it"
    )


def verified_shards(directory: str | os.PathLike, verify: bool = True) -> list[Path]:
    """The complete shards of a dataset after checking the metadata and each shard against their checksums.

    A shard written by a run killed before it recorded the checksum is left out, with a warning.
    A dataset written before checksums existed (no ``checksums.json``) loads with a warning.

    Raises:
        DatasetCorruptError: naming the first file that is unreadable or changed since it was written.
    """
    directory = Path(directory)
    metadata_path = directory / METADATA_FILE
    read_metadata(directory)
    ledger = ChecksumLedger(directory, CHECKSUMS_FILE)
    try:
        ledger.sums()
    except ValueError as error:
        raise DatasetCorruptError(str(error)) from None
    files = shard_files(directory)
    if not ledger.exists and verify:
        raise DatasetCorruptError(
            f"{directory} has no {CHECKSUMS_FILE}: its shards cannot be verified (deleted, or an older drrl wrote it); "
            "pass --no-verify to load it unverified"
        )
    if not ledger.exists:
        print(f"warning: {directory} has no {CHECKSUMS_FILE}: loading its shards unverified", file=sys.stderr)
    elif ledger.status(metadata_path) != "ok":
        raise _corrupt(metadata_path, "does not match its recorded SHA-256")
    verified = []
    for path in files:
        status = ledger.status(path) if ledger.exists else "ok"
        if status == "mismatch":
            raise _corrupt(path, "does not match its recorded SHA-256 (corrupted or changed)")
        if status == "unrecorded":
            print(f"warning: {path} has no recorded checksum (its run was cut off); leaving it out", file=sys.stderr)
            continue
        try:
            pq.read_metadata(path)
        except (OSError, pa.ArrowException) as error:
            raise _corrupt(path, f"is not a readable parquet file ({error})") from None
        verified.append(path)
    return verified


def load_trajectories(directory: str | os.PathLike, verify: bool = True) -> datasets.Dataset:
    """The trajectories in ``directory`` as one ``datasets.Dataset`` (rows in episode and step order), verified.

    A dataset that holds fewer episodes than its metadata names (a run still writing it, or one cut off) loads what
    it holds, with a warning that says how many.
    """
    files = verified_shards(directory, verify)
    if not files:
        raise FileNotFoundError(f"{directory} holds no complete shard yet")
    data = datasets.Dataset.from_parquet([str(f) for f in files], keep_in_memory=True)
    held, expected = len(data.unique("episode")), int(read_metadata(directory)["episodes"])
    if held < expected:  # still being written, or its run was cut off: say so rather than train on less unawares
        print(f"warning: {directory} holds {held} of its {expected} episodes (still being written, or cut off)",
              file=sys.stderr)  # fmt: skip
    return data


def _flatten(metadata: dict[str, Any]) -> dict[str, Any]:
    """``env_config`` fields lifted to the top level, for error messages that name the differing field."""
    flat = {k: v for k, v in metadata.items() if k != "env_config"}
    return {**flat, **metadata.get("env_config", {})}


def _check_resumable(directory: Path, metadata: dict[str, Any]) -> int:
    """Raise ``DatasetMismatchError`` if ``directory`` holds another setup's dataset; return its episode count.

    The device is not part of the setup: a dataset made on the CPU is extended on 'auto' (and the
    other way round), as the warm start's cache key (``agents.warm_start.teacher_folder``) expects.
    """
    if not (directory / METADATA_FILE).exists():
        return 0
    stored = read_metadata(directory)
    stored_id = {k: v for k, v in stored.items() if k not in ("episodes", "steps_per_episode")}
    stored_id["env_config"] = {**stored_id.get("env_config", {}), "device": None}
    metadata = {**metadata, "env_config": {**metadata.get("env_config", {}), "device": None}}
    if stored_id != metadata:
        flat_stored, flat_requested = _flatten(stored_id), _flatten(metadata)
        differing = sorted(k for k in {*flat_stored, *flat_requested} if flat_stored.get(k) != flat_requested.get(k))
        details = "; ".join(
            f"{k}: stored {flat_stored.get(k)!r}, requested {flat_requested.get(k)!r}" for k in differing
        )
        raise DatasetMismatchError(
            f"{directory} holds trajectories made with a different setup ({details}); "
            "nothing was written: choose another output folder, or the options it was made with"
        )
    return int(stored.get("episodes", 0))


def _shard_is_complete(path: Path, ledger: ChecksumLedger, rows: int) -> bool:
    """Whether an earlier run's shard at ``path`` can be kept: recorded, unchanged, with ``rows`` rows."""
    if not path.exists():
        return False
    status = ledger.status(path)
    if status != "ok":
        problem = "changed since it was written" if status == "mismatch" else "has no recorded checksum"
        print(f"warning: {path} {problem}; recomputing it", file=sys.stderr)
        return False
    try:
        return pq.read_metadata(path).num_rows == rows
    except (OSError, pa.ArrowException):
        return False


def run_episode(env: gym.Env, policy: RankPolicy, episode: int, seed: int) -> Iterator[dict[str, Any]]:
    """Roll out one seeded episode of ``policy`` on ``env`` (unwrapped); yield one row per step.

    A column the env's ``info`` lacks (DRRL-KVCache-v0 has no fidelity, FLOPs or perturbation) is NaN.
    """
    observation, info = env.reset(seed=seed)
    policy.reset(seed)
    prompt = int(env.prompt_index) if hasattr(type(env), "prompt_index") else -1
    step, terminated = 0, False
    per_group = getattr(env.config, "per_head", False)
    while not terminated:
        mask = env.action_masks()
        action = policy.act(observation, mask, env)
        next_observation, reward, terminated, _, info = env.step(action)
        terms = info["reward_terms"]
        yield {
            "observation": observation,
            "action": np.asarray(action).reshape(-1).tolist() if per_group else int(np.asarray(action).reshape(())),
            "rank": list(info["rank"]) if per_group else int(info["rank"]),
            "action_mask": mask,
            "reward": float(reward),
            **{f"reward_{term}": float(terms.get(term, 0.0)) for term in REWARD_TERMS},
            "fidelity": float(info.get("fidelity", np.nan)),
            "flops_ratio": float(info["flops"] / info["flops_full"]) if "flops" in info else np.nan,
            "perturbation": float(info.get("perturbation", np.nan)),
            "layer": info["layer"],
            "segment": info.get("segment", 0),
            "step": step,
            "episode": episode,
            "seed": seed,
            "prompt": prompt,
        }
        observation, step = next_observation, step + 1


def record_trajectories(
    directory: str | os.PathLike,
    policy: RankPolicy,
    episodes: int,
    env_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    episodes_per_shard: int = 8,
    progress: bool = True,
    env_id: str = ENV_ID,
) -> datasets.Dataset:
    """Roll out ``episodes`` episodes of ``policy`` and write them to ``directory``, resuming what is there.

    Args:
        directory: the dataset folder; created if missing. If it already holds a dataset, it
            must have been made with the same env configuration, policy, seed and shard size
            (``DatasetMismatchError`` otherwise, and nothing is written); its complete shards
            are kept and the run continues from the first missing one.
        policy: a :class:`~oracle.policy.RankPolicy`.
        episodes: the total number of episodes the dataset should hold.
        env_kwargs: ``gym.make(env_id, ...)`` keywords (with ``per_head``, the action and rank columns hold one
            entry per key/value group).
        seed: episode ``i`` runs with seed ``seed + i``.
        episodes_per_shard: episodes per parquet shard (the unit of resumption).
        progress: show a progress bar (episodes/s and the mean episode return).
        env_id: the registered env (a DRRL-Attention id, or DRRL-KVCache-v0 with a policy of ``oracle.kvcache``).

    Returns:
        The whole dataset, loaded back from disk.
    """
    if episodes < 1 or episodes_per_shard < 1:
        raise ValueError(f"episodes and episodes_per_shard must be >= 1, got {episodes} and {episodes_per_shard}")
    directory = check_output_folder(directory, "dataset folder")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / METADATA_FILE).exists():
        raise ValueError(
            f"dataset folder {str(directory)!r} is not empty and holds no trajectory dataset; "
            "choose a new or empty folder"
        )
    env = gym.make(env_id, **(env_kwargs or {})).unwrapped
    try:
        metadata = dataset_metadata(env.config, policy.name, seed, episodes_per_shard, env_id)
        stored_episodes = _check_resumable(directory, metadata)
        remove_stale_temporaries(directory, [METADATA_FILE, CHECKSUMS_FILE])
        remove_stale_temporaries(directory / DATA_DIR, ["shard-*"])
        steps_per_episode = env.num_layers * env.num_segments
        metadata.update(steps_per_episode=steps_per_episode, episodes=max(episodes, stored_episodes))
        ledger = ChecksumLedger(directory, CHECKSUMS_FILE)
        try:
            ledger.sums()
        except ValueError as error:
            print(f"warning: {error}; recomputing every shard", file=sys.stderr)
            ledger.clear()
        ledger.record(write_text_atomic(directory / METADATA_FILE, json.dumps(metadata, indent=2)))
        per_head = getattr(env.config, "per_head", False)
        features = trajectory_features(env.observation_space.shape[0], env.kv_heads if per_head else None)
        first_shard = _shard_path(directory, 0)
        if stored_episodes and first_shard.exists() and "prompt" not in pq.read_schema(first_shard).names:
            del features["prompt"]  # resuming a dataset written before the column: its shards must agree
        bar = tqdm(total=episodes, unit="episode", desc=f"{policy.name} trajectories", disable=not progress)
        returns: list[float] = []
        for first in range(0, episodes, episodes_per_shard):
            shard_episodes = range(first, min(first + episodes_per_shard, episodes))
            path = _shard_path(directory, first // episodes_per_shard)
            if _shard_is_complete(path, ledger, len(shard_episodes) * steps_per_episode):
                bar.update(len(shard_episodes))  # complete from an earlier run
                continue
            rows: list[dict[str, Any]] = []
            for episode in shard_episodes:
                if hasattr(env, "set_guardrail_step"):  # Eq. 11's t as if trained on this data
                    env.set_guardrail_step(episode * steps_per_episode)
                episode_rows = list(run_episode(env, policy, episode, seed + episode))
                rows.extend(episode_rows)
                returns.append(sum(row["reward"] for row in episode_rows))
                bar.update(1)
                bar.set_postfix(mean_return=f"{np.mean(returns):.3f}")
            columns = {name: [row[name] for row in rows] for name in features}
            ledger.record(write_atomic(path, datasets.Dataset.from_dict(columns, features=features).to_parquet))
        bar.close()
    finally:
        env.close()
    return load_trajectories(directory)
