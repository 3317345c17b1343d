"""``python -m oracle``: record greedy-oracle trajectories of DRRL-Attention-v0 as an HF dataset."""

from __future__ import annotations

import argparse
import sys

from drrl_env.cli import add_env_arguments, env_kwargs
from drrl_env.files import check_output_folder
from oracle.dataset import DatasetMismatchError, record_trajectories
from oracle.hindsight import PROFILE_ESTIMATES, HindsightOracle
from oracle.policy import GreedyOracle, RankPolicy

DATASET_HELP = (
    "Trajectories go to DIR as parquet shards of an HF dataset (load with oracle.load_trajectories or "
    "datasets.load_dataset('parquet', data_dir='DIR/data')); the env configuration is in DIR/metadata.json. "
    "An interrupted run resumes when started again with the same options."
)


def add_record_arguments(parser: argparse.ArgumentParser) -> None:
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
    add_env_arguments(parser, reward="eq13")  # the greedy oracle scores the per-step Eq. 13 reward


def record_command(args: argparse.Namespace, policy: RankPolicy) -> int:
    """Record ``policy`` as ``args`` say; print a summary; exit status 2 with a one-line error on a mismatch."""
    try:
        check_output_folder(args.out, "--out")
        dataset = record_trajectories(
            args.out, policy, args.episodes, env_kwargs(args), args.seed, args.episodes_per_shard
        )
    except (DatasetMismatchError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.out}: {dataset.num_rows} steps, mean reward {sum(dataset['reward']) / dataset.num_rows:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m oracle",
        description="Roll out an oracle: 'greedy' (at each step the allowed rank with the highest Eq. 13 reward, "
        "all candidates scored in one batched pass) or 'hindsight' (the episode's budget spent by water-filling "
        "the KL each layer alone costs on this input; label-free; needs --flops-budget). " + DATASET_HELP,
    )
    parser.add_argument(
        "--policy", choices=("greedy", "hindsight"), default="greedy", help="which oracle (default: greedy)"
    )
    parser.add_argument(
        "--lookahead",
        type=int,
        default=0,
        help="score each candidate by its reward plus the next K greedy rewards (replays the episode prefix: "
        "about K x t extra env steps at step t) (default: 0, plain greedy)",
    )
    parser.add_argument(
        "--estimate",
        choices=PROFILE_ESTIMATES,
        default="exact",
        help="hindsight only: measure each episode's layer KL profile exactly (about L x K / 2 forwards) or "
        "estimate it from the Fisher information of the model's own predictions (16 backward passes; 4-5x "
        "cheaper on SmolLM2) (default: exact)",
    )
    add_record_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.policy == "hindsight":
        if args.lookahead:
            print("error: --lookahead belongs to the greedy oracle, not --policy hindsight", file=sys.stderr)
            return 2
        return record_command(args, HindsightOracle(args.estimate))
    if args.estimate != "exact":
        print("error: --estimate belongs to --policy hindsight, not the greedy oracle", file=sys.stderr)
        return 2
    return record_command(args, GreedyOracle(args.lookahead))


if __name__ == "__main__":
    sys.exit(main())
