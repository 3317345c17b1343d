"""Recording a rank policy's trajectories from the command line: the options and the one call both commands share.

``python -m oracle`` (the oracles) and ``python -m agents.record`` (any policy of the zoo) use it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from drrl_env.cli import add_env_arguments
from drrl_env.lm.files import check_output_folder
from oracle.dataset import DatasetMismatchError, record_trajectories
from oracle.policy import RankPolicy

DATASET_HELP = (
    "Trajectories go to DIR as parquet shards of an HF dataset (load with oracle.load_trajectories or "
    "datasets.load_dataset('parquet', data_dir='DIR/data')); the env configuration is in DIR/metadata.json. "
    "An interrupted run resumes when started again with the same options."
)


def add_record_arguments(parser: argparse.ArgumentParser, env_id: str) -> None:
    """Options of a trajectory-recording command: episodes, output, seeding, sharding, env options."""
    parser.add_argument("--episodes", type=int, required=True, help="number of episodes the dataset should hold")
    parser.add_argument("--out", required=True, help="dataset folder (DIR); resumed if it holds this setup's data")
    parser.add_argument("--seed", type=int, default=0, help="episode i is seeded with seed + i (default: 0)")
    parser.add_argument(
        "--episodes-per-shard",
        type=int,
        default=8,
        help="episodes per parquet shard, the unit of resuming (default: 8)",
    )
    add_env_arguments(parser, env_id, reward="eq13")  # the greedy oracle scores the per-step Eq. 13 reward


@dataclass
class RecordingConfig:
    """What :func:`add_record_arguments` asks for, by field name."""

    episodes: int
    """number of episodes the dataset should hold"""
    out: str
    """dataset folder; resumed if it holds this setup's data"""
    seed: int = 0
    """episode i is seeded with seed + i"""
    episodes_per_shard: int = 8
    """episodes per parquet shard, the unit of resuming"""


def record_command(config: RecordingConfig, policy: RankPolicy, env_kwargs: dict[str, Any]) -> int:
    """Record ``policy`` as ``config`` says; print a summary; exit status 2 with a one-line error on a mismatch."""
    try:
        check_output_folder(config.out, "--out")
        dataset = record_trajectories(
            config.out, policy, config.episodes, env_kwargs, config.seed, config.episodes_per_shard
        )
    except (DatasetMismatchError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{config.out}: {dataset.num_rows} steps, mean reward {sum(dataset['reward']) / dataset.num_rows:.4f}")
    return 0
