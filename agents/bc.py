"""Behaviour cloning of a rank policy on a trajectory dataset (paper IV.E.3, stage one).

The policy is the one MaskablePPO trains (:mod:`agents.networks`), and the loss is the masked
cross-entropy of its own action distribution: ``-log pi(a_oracle | s, mask)``, where sb3-contrib's
masking gives masked ranks zero probability. The dataset's last ``validation_fraction`` of
prompts (DRRL-KVCache-v0's pool, whose prompts several episodes share) or, in an env without a prompt pool, of
episodes (held-out text) is kept for validation; each epoch logs ``bc/train_loss``,
``bc/val_loss``, ``bc/train_accuracy`` and ``bc/val_accuracy`` (top-1 agreement with the
recorded actions, under the masks) to TensorBoard through SB3's logger. The result is saved as
a MaskablePPO agent file (:mod:`agents.agent_file`), which ``train_agent.py --bc-model FILE``
continues with PPO.

    python -m agents.bc --dataset DIR --out FILE.safetensors [--network mlp|transformer] [--epochs 30]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from sb3_contrib import MaskablePPO
from stable_baselines3.common.logger import configure
from tqdm.auto import tqdm

from agents.agent_file import agent_path, save_agent
from agents.networks import DEFAULT_HISTORY, NETWORKS, policy_setup
from drrl_env.cli import add_dataclass_arguments, at_least, dataclass_from_options
from drrl_env.lm.files import check_output_folder
from drrl_env.wrappers import stack_states
from oracle.dataset import env_config_of, env_id_of_dataset, load_trajectories, read_metadata


@dataclass
class BCConfig:
    """Behaviour-cloning hyperparameters."""

    network: str = "mlp"
    """policy network: 'mlp' or 'transformer'"""
    history: int = DEFAULT_HISTORY
    """states in the Transformer's window"""
    epochs: int = 30
    """passes over the training episodes"""
    batch_size: int = 64
    """steps per gradient step"""
    learning_rate: float = 1e-3
    """Adam learning rate"""
    validation_fraction: float = 0.2
    """fraction of prompts (an env with a prompt pool) or episodes held out (the last ones), at least one"""
    seed: int = 0
    """seed of the policy's initialisation and of the shuffling"""
    entropy_coef: float = 0.0
    """weight of an entropy bonus: > 0 keeps the cloned policy stochastic, so PPO can still explore from it"""
    verify: bool = True
    """check the dataset's shards against its checksums.json; --no-verify loads a dataset without one, unverified"""

    def __post_init__(self) -> None:
        policy_setup(self.network, self.history)  # names the bad network or history
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate >= 0):
            raise ValueError(f"learning_rate must be a finite number >= 0, got {self.learning_rate!r}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must lie in (0, 1), got {self.validation_fraction!r}")
        if not (math.isfinite(self.entropy_coef) and self.entropy_coef >= 0):
            raise ValueError(f"entropy_coef must be a finite number >= 0, got {self.entropy_coef!r}")


@dataclass
class BCResult:
    """Per-epoch curves of a behaviour-cloning run."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    held_out: str = "episodes"
    """what the validation rows hold out: 'prompts' (an env with a prompt pool) or 'episodes'"""


@dataclass
class Demonstrations:
    """Arrays of a trajectory dataset as the policy sees them."""

    observations: np.ndarray  # (N, D) or (N, W, D + 1)
    masks: np.ndarray  # (N, K) bool, or (N, Hkv * K) group-major with per-head ranks
    actions: np.ndarray  # (N,) int64, or (N, Hkv) with per-head ranks
    episodes: np.ndarray  # (N,) int64
    prompts: np.ndarray | None = None  # (N,) int64: the episode's prompt in the env's pool (None, or -1: no pool)

    def held_out_rows(self, fraction: float) -> tuple[np.ndarray, np.ndarray, str]:
        """Training and validation rows: the last ``fraction`` of prompts held out, or of episodes without a pool.

        Returns ``(train_rows, validation_rows, unit)``, ``unit`` 'prompts' or 'episodes'. Holding out whole prompts
        keeps the validation agreement honest where several episodes share a prompt (they share its statistics).
        """
        groups, unit = self.episodes, "episodes"
        if self.prompts is not None and (self.prompts >= 0).all() and len(np.unique(self.prompts)) >= 2:
            groups, unit = self.prompts, "prompts"
        ids = np.unique(groups)
        if len(ids) < 2:
            raise ValueError(f"the dataset holds {len(ids)} {unit[:-1]}(s); behaviour cloning needs at least 2")
        held_out = ids[-max(1, math.ceil(fraction * len(ids))) :]
        validation = np.isin(groups, held_out)
        return np.flatnonzero(~validation), np.flatnonzero(validation), unit


def load_demonstrations(directory: str | os.PathLike, history: int = 0, verify: bool = True) -> Demonstrations:
    """Load a dataset; with ``history > 0`` each observation becomes the window of its episode's last states.

    ``verify=False`` loads a dataset without checksums (``--no-verify``).
    """
    data = load_trajectories(directory, verify).with_format("numpy")
    observations = np.stack(data["observation"]).astype(np.float32)
    episodes, steps = np.asarray(data["episode"]), np.asarray(data["step"])
    if history:
        windows = []
        for index in range(len(observations)):
            first = index - int(steps[index])  # rows of an episode are consecutive, step 0 first
            windows.append(stack_states(list(observations[first : index + 1]), history))
        observations = np.stack(windows)
    masks = np.stack(data["action_mask"]).astype(bool)
    actions = np.stack(data["action"]) if len(data) and np.ndim(data["action"][0]) else np.asarray(data["action"])
    prompts = np.asarray(data["prompt"]) if "prompt" in data.column_names else None
    return Demonstrations(observations, masks, actions.astype(np.int64), episodes, prompts)


def _evaluate(model: MaskablePPO, demos: Demonstrations, rows: np.ndarray, batch_size: int) -> tuple[float, float]:
    """Mean masked cross-entropy and top-1 agreement on ``rows`` (per-head ranks: the share of groups that agree)."""
    losses, hits = [], 0.0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            loss, correct = _batch_loss(model, demos, batch)
            losses.append(float(loss) * len(batch))
            hits += correct
    return sum(losses) / len(rows), hits / len(rows)


def _batch_loss(
    model: MaskablePPO, demos: Demonstrations, rows: np.ndarray, entropy_coef: float = 0.0
) -> tuple[torch.Tensor, float]:
    """Masked cross-entropy ``-log pi(a | s, mask)`` (minus ``entropy_coef`` times the entropy) and the hits.

    With a MultiDiscrete action (per-head ranks) ``log pi`` sums over the groups, and a row's hit is the share
    of its groups whose most likely candidate is the recorded one.
    """
    policy = model.policy
    observations = torch.as_tensor(demos.observations[rows], device=policy.device)
    actions = torch.as_tensor(demos.actions[rows], device=policy.device)
    distribution = policy.get_distribution(observations, action_masks=demos.masks[rows])
    loss = -distribution.log_prob(actions).mean()
    if entropy_coef:
        loss = loss - entropy_coef * distribution.entropy().mean()
    agree = (distribution.mode() == actions).double()
    return loss, float(agree.reshape(len(rows), -1).mean(dim=1).sum())


def behaviour_clone(
    dataset: str | os.PathLike,
    config: BCConfig | None = None,
    logdir: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[MaskablePPO, BCResult]:
    """Fit a MaskablePPO policy's action distribution to the actions of a trajectory dataset.

    Args:
        dataset: a folder written by ``python -m oracle`` (or any :func:`oracle.record_trajectories`).
        config: hyperparameters (defaults: :class:`BCConfig`).
        logdir: TensorBoard folder for the ``bc/*`` curves (None: no logging).
        progress: show a progress bar over epochs.

    Returns:
        The model (a MaskablePPO whose env is the dataset's env configuration) and the curves.
    """
    config = config or BCConfig()
    setup = policy_setup(config.network, config.history)
    metadata = read_metadata(dataset)
    demos = load_demonstrations(dataset, setup.history, config.verify)
    env = setup.wrap(gym.make(env_id_of_dataset(metadata), **env_config_of(metadata)))
    model = MaskablePPO("MlpPolicy", env, policy_kwargs=setup.policy_kwargs, seed=config.seed, device="cpu")
    try:
        train_rows, val_rows, result_unit = demos.held_out_rows(config.validation_fraction)
    except ValueError as error:
        raise ValueError(f"{dataset}: {error}") from None
    logger = configure(str(logdir), ["tensorboard"]) if logdir is not None else None
    optimizer = torch.optim.Adam(model.policy.parameters(), lr=config.learning_rate)
    rng = np.random.default_rng(config.seed)
    result = BCResult(held_out=result_unit)
    bar = tqdm(range(config.epochs), desc="behaviour cloning", unit="epoch", disable=not progress)
    for epoch in bar:
        model.policy.set_training_mode(True)
        order = rng.permutation(train_rows)
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            loss, _ = _batch_loss(model, demos, batch, config.entropy_coef)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.policy.set_training_mode(False)
        train_loss, train_accuracy = _evaluate(model, demos, train_rows, 256)
        val_loss, val_accuracy = _evaluate(model, demos, val_rows, 256)
        for name, value in (
            ("train_loss", train_loss),
            ("val_loss", val_loss),
            ("train_accuracy", train_accuracy),
            ("val_accuracy", val_accuracy),
        ):
            getattr(result, name).append(value)
            if logger is not None:
                logger.record(f"bc/{name}", value)
        if logger is not None:
            logger.dump(step=epoch)
        bar.set_postfix(val_loss=f"{val_loss:.3f}", val_accuracy=f"{val_accuracy:.3f}")
    if logger is not None:
        logger.close()
    return model, result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m agents.bc",
        description="Behaviour cloning: fit a MaskablePPO policy to a trajectory dataset by masked cross-entropy "
        "and save it as a MaskablePPO agent file (continue with train_agent.py --bc-model FILE).",
    )
    parser.add_argument("--dataset", required=True, help="trajectory dataset folder (from python -m oracle)")
    parser.add_argument("--out", required=True, help="agent file to write (.safetensors added if missing)")
    parser.add_argument("--logdir", default="runs/bc", help="TensorBoard folder of the bc/* curves (default: runs/bc)")
    add_dataclass_arguments(
        parser,
        BCConfig,
        "behaviour cloning (BCConfig)",
        choices={"network": NETWORKS},
        types={name: at_least(1) for name in ("history", "epochs", "batch_size")},
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = dataclass_from_options(BCConfig, vars(args))
        if not args.out.strip() or agent_path(args.out).is_dir() or Path(args.out).is_dir():
            raise ValueError(f"--out must name an agent file, not a folder, got {args.out!r}")
        check_output_folder(agent_path(args.out).parent, "--out's folder")
        check_output_folder(args.logdir, "--logdir")
        model, result = behaviour_clone(args.dataset, config, args.logdir)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    path = save_agent(model, args.out)
    print(
        f"saved {path}: held-out agreement with the dataset's actions {result.val_accuracy[-1]:.3f} "
        f"({result.held_out} held out), "
        f"loss {result.val_loss[-1]:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
