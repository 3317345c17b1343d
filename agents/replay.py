"""Replay an episode record; say whether it gives the same ranks and rewards (``drrl_env.replay.replay``).

Usage::

    python -m agents.replay RECORD.json [--atol 1e-9] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from drrl_env.replay import replay


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agents.replay", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("record", type=Path, help="an episode record (JSON from env.unwrapped.episode_record())")
    parser.add_argument("--atol", type=float, default=1e-9, help="absolute tolerance on rewards (default: 1e-9)")
    parser.add_argument("--device", help="run the replay on this device instead of the recorded one")
    args = parser.parse_args(argv)
    try:
        record = json.loads(args.record.read_text())
    except (OSError, json.JSONDecodeError) as error:
        print(f"error: cannot read the record {args.record}: {error}", file=sys.stderr)
        return 2
    if not isinstance(record, dict):
        print(f"error: {args.record} is not an episode record (a JSON object)", file=sys.stderr)
        return 2
    try:
        result = replay(record, args.atol, **({"device": args.device} if args.device else {}))
    except (ValueError, TypeError) as error:
        print(f"error: {args.record}: {error}", file=sys.stderr)
        return 2
    where = "" if result.matches else " (diverged)"
    print(f"{args.record}: {result.message}{where}; {result.steps} step(s) replayed")
    return 0 if result.matches else 1


if __name__ == "__main__":
    raise SystemExit(main())
