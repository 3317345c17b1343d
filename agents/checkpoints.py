"""Checkpoints of a training run, stored without pickles and checked by SHA-256; resume from the newest good one.

A checkpoint ``step_N`` (``N`` env steps done) under ``RUN/checkpoints`` is four files:

- ``step_N.safetensors``: the policy, an agent file (:mod:`agents.agent_file`);
- ``step_N.state.pt``: the optimizer's state, SB3's counters, the RNG states (torch, numpy,
  random, the action space's) and every env's position (episode index and Eq. 11's guardrail
  step), as tensors and plain values only: it is read with ``torch.load(weights_only=True)``,
  which runs no code;
- ``step_N.replay.safetensors``: the replay buffer's arrays (dqn, qrdqn only);
- ``step_N.json``: the manifest, written last, with the SHA-256 of each file above.

A checkpoint counts once its manifest exists. Resuming takes the newest checkpoint whose files
match their checksums; a newer one that is corrupt or incomplete is skipped with a warning that
names it. Checkpoints are taken only at episode boundaries (every env just reset): episodes are
seeded by index, so a resumed run replays exactly the episodes, actions and updates of an
uninterrupted one (on CPU, the same final model).
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback

from agents.agent_file import load_agent_into, save_agent
from agents.networks import PolicySetup
from drrl_env.lm.files import first_line, remove_stale_temporaries, sha256_of, write_atomic, write_text_atomic

COUNTERS = (
    "num_timesteps",
    "_episode_num",
    "_n_updates",
    "_current_progress_remaining",
    "_n_calls",
    "exploration_rate",
)
"""SB3 attributes that training advances (those a model has are saved)."""
REPLAY_ARRAYS = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")
FILES = {"agent": ".safetensors", "state": ".state.pt", "replay": ".replay.safetensors"}


class ConfigChangedError(ValueError):
    """A run's config.json differs from the one its checkpoints were written with."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint's files are missing, unreadable, or differ from their recorded checksums."""


def _stem(directory: Path, num_timesteps: int) -> Path:
    return directory / f"step_{num_timesteps:09d}"


def at_episode_boundary(model: BaseAlgorithm) -> bool:
    """Whether every env of ``model`` has just been reset (no step of its current episode taken)."""
    return all(steps == 0 for _, _, steps in model.get_env().env_method("get_position"))


def training_state(model: BaseAlgorithm) -> dict[str, Any]:
    """Everything but the policy's weights that resuming ``model`` needs, as tensors and plain values."""
    numpy_state = np.random.get_state()
    episodes = [
        {"r": float(info["r"]), "l": int(info["l"]), "t": float(info["t"])} for info in model.ep_info_buffer or ()
    ]
    return {
        "optimizer": model.policy.optimizer.state_dict(),
        "counters": {name: getattr(model, name) for name in COUNTERS if hasattr(model, name)},
        "episode_infos": episodes,
        "positions": [[int(e), int(g)] for e, g, _ in model.get_env().env_method("get_position")],
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
            "random": random.getstate(),
            "action_space": model.action_space.np_random.bit_generator.state,
        },
    }


def save_checkpoint(model: BaseAlgorithm, directory: Path, residual: PolicySetup | None = None) -> Path:
    """Write checkpoint ``step_N`` of ``model`` under ``directory`` (manifest last); returns the manifest's path.

    ``residual``: a residual policy's setup, stored in the agent file (see :func:`agents.agent_file.save_agent`).

    Raises ``RuntimeError`` if an env is mid-episode: such a checkpoint could not be resumed exactly.
    """
    if not at_episode_boundary(model):
        raise RuntimeError("checkpoints are taken at episode boundaries; an env is mid-episode")
    stem = _stem(directory, model.num_timesteps)
    written = {"agent": save_agent(model, stem.with_suffix(FILES["agent"]), residual)}
    written["state"] = write_atomic(stem.with_suffix(FILES["state"]), lambda p: torch.save(training_state(model), p))
    buffer = getattr(model, "replay_buffer", None)
    if buffer is not None:
        arrays = {name: getattr(buffer, name) for name in REPLAY_ARRAYS if getattr(buffer, name, None) is not None}
        metadata = {"pos": str(buffer.pos), "full": str(int(buffer.full))}
        written["replay"] = write_atomic(
            stem.with_suffix(FILES["replay"]), lambda p: safetensors.numpy.save_file(arrays, p, metadata)
        )
    manifest = {"num_timesteps": int(model.num_timesteps), "sha256": {k: sha256_of(p) for k, p in written.items()}}
    config = directory.parent / "config.json"  # the run's options: a resume refuses them edited
    if config.is_file():
        manifest["config_sha256"] = sha256_of(config)
    return write_text_atomic(stem.with_suffix(".json"), json.dumps(manifest, indent=2))


def verify_checkpoint(manifest_path: Path) -> dict[str, Path]:
    """The files of the checkpoint whose manifest is ``manifest_path``, after checking them against their checksums.

    Raises:
        CorruptCheckpointError: naming the file that is missing, unreadable or changed.
    """
    try:
        manifest = json.loads(manifest_path.read_text())
        checksums = manifest["sha256"]
        if not isinstance(checksums, dict) or "agent" not in checksums or "state" not in checksums:
            raise ValueError("no checksums of the agent and state files")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CorruptCheckpointError(f"{manifest_path}: unreadable manifest ({error})") from error
    config = manifest_path.parent.parent / "config.json"
    if "config_sha256" in manifest and (not config.is_file() or sha256_of(config) != manifest["config_sha256"]):
        raise ConfigChangedError(
            f"{config} was changed after checkpoint {manifest_path.stem} was written; a run resumes with the options "
            "it was started with: restore the file, or start a new run"
        )
    files = {}
    for kind, checksum in checksums.items():
        if kind not in FILES:
            raise CorruptCheckpointError(f"{manifest_path}: unknown file kind {kind!r}")
        path = manifest_path.with_suffix(FILES[kind])
        if not path.is_file():
            raise CorruptCheckpointError(f"{path} is missing")
        if sha256_of(path) != checksum:
            raise CorruptCheckpointError(f"{path} does not match its recorded SHA-256 (corrupted or changed)")
        files[kind] = path
    return files


def latest_checkpoint(directory: Path) -> dict[str, Path] | None:
    """The files of the newest checkpoint under ``directory`` that verifies; warns about each newer bad one."""
    remove_stale_temporaries(directory, ["step_*"])
    for manifest in sorted(directory.glob("step_*.json"), reverse=True):
        try:
            return verify_checkpoint(manifest)
        except CorruptCheckpointError as error:
            print(f"warning: skipping checkpoint {manifest.stem}: {error}", file=sys.stderr)
    return None


def restore_checkpoint(model: BaseAlgorithm, files: dict[str, Path]) -> None:
    """Put a freshly built ``model`` (with its envs) where the checkpoint ``files`` left training.

    The training state is read and checked before anything of ``model`` changes.
    """
    try:
        state = torch.load(files["state"], weights_only=True)
    except Exception as error:  # a file that passed its checksum but is not a weights-only state
        reason = first_line(error)
        raise CorruptCheckpointError(
            f"{files['state']} is not a readable training state: weights-only loading refused it ({reason}); "
            "a state file holds only tensors and plain values, so this one is corrupt or crafted"
        ) from error
    missing = {"optimizer", "counters", "episode_infos", "positions", "rng"} - set(
        state if isinstance(state, dict) else ()
    )
    if missing:
        raise CorruptCheckpointError(f"{files['state']} is not a training state (missing {sorted(missing)})")
    counters = state["counters"] if isinstance(state["counters"], dict) else {}
    for name, value in counters.items():  # only the counters training advances, each a finite number >= 0
        ok = name in COUNTERS and isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value < 0:
            raise CorruptCheckpointError(
                f"{files['state']}: counter {name!r} = {value!r} is not one a training state restores "
                f"(expected a number >= 0 for one of {list(COUNTERS)})"
            )
    load_agent_into(model, files["agent"])
    model.policy.optimizer.load_state_dict(state["optimizer"])
    for name, value in counters.items():
        setattr(model, name, value)
    model.ep_info_buffer = deque(state["episode_infos"], maxlen=model._stats_window_size)
    model.ep_success_buffer = deque(maxlen=model._stats_window_size)
    env = model.get_env()
    if len(state["positions"]) != env.num_envs:
        raise ValueError(f"the checkpoint has {len(state['positions'])} envs, this run {env.num_envs} (--n-envs)")
    for index, (episode, guardrail_step) in enumerate(state["positions"]):
        env.env_method("set_position", episode - 1, guardrail_step, indices=[index])  # re-run the pending reset
    model._last_obs = env.reset()  # the first observation of the pending episodes, as before the stop
    model._last_episode_starts = np.ones(env.num_envs, dtype=bool)
    if "replay" in files:
        _restore_replay_buffer(model, files["replay"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(rng["random"])
    model.action_space.np_random.bit_generator.state = rng["action_space"]


def _restore_replay_buffer(model: BaseAlgorithm, path: Path) -> None:
    buffer = model.replay_buffer
    with safetensors.safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata() or {}
        for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
            array = handle.get_tensor(name)
            target = getattr(buffer, name, None)
            if name not in REPLAY_ARRAYS or target is None or target.shape != array.shape:
                raise CorruptCheckpointError(f"{path}: array {name!r} does not fit this run's replay buffer")
            target[...] = array
    buffer.pos, buffer.full = int(metadata["pos"]), bool(int(metadata["full"]))


class CheckpointCallback(BaseCallback):
    """Checkpoint every ``every`` env steps, between updates, at the first episode boundary past each multiple."""

    def __init__(self, directory: Path, every: int, residual: PolicySetup | None = None) -> None:
        super().__init__()
        self.directory, self.every, self.residual = directory, every, residual
        self._next = 0

    def _on_training_start(self) -> None:
        self._next = (self.num_timesteps // self.every + 1) * self.every

    def _on_rollout_start(self) -> None:
        if self.num_timesteps >= self._next and at_episode_boundary(self.model):
            save_checkpoint(self.model, self.directory, self.residual)
            self._next = (self.num_timesteps // self.every + 1) * self.every

    def _on_step(self) -> bool:
        return True
