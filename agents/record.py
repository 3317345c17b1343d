"""``python -m agents.record``: trajectories of any policy (a baseline or a saved model) through the oracle's writer.

    python -m agents.record --policy fixed:32 --episodes 16 --out data/fixed32 [env options]

The dataset has the format of ``python -m oracle`` (see :mod:`oracle.dataset`), so trajectories
of every policy can be kept and compared, or used for behaviour cloning.
"""

from __future__ import annotations

import argparse
import sys

from agents.zoo import check_policy_spec, make_policy
from drrl_env.cli import dataclass_from_options, env_id_of, env_kwargs
from oracle.recording import DATASET_HELP, RecordingConfig, add_record_arguments, record_command


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m agents.record",
        description="Roll out a policy on DRRL-Attention-v0 and record its trajectories. " + DATASET_HELP,
    )
    parser.add_argument(
        "--policy",
        required=True,
        help="a baseline spec (fixed:32, energy:0.9, random, stable_rank, ...; see oracle.baselines) or a saved "
        "agent (PATH.safetensors; an SB3 zip [ALGO:]PATH.zip only with --trust-pickle)",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow an SB3 .zip model as --policy: it is a pickle, and a crafted one runs code when loaded",
    )
    add_record_arguments(parser, env_id_of(argv))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    try:
        check_policy_spec(args.policy, "--policy")  # before the model loads
        policy = make_policy(args.policy, env_kwargs(vars(args)), args.trust_pickle)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return record_command(dataclass_from_options(RecordingConfig, vars(args)), policy, env_kwargs(vars(args)))


if __name__ == "__main__":
    sys.exit(main())
