"""DRRL-KVCache-v0's fixed rules, teacher and ceiling, at equal key-cache bytes on held-out prompts.

Question: in the key-cache env, where a prompt's own decode profile over its first generated tokens predicted
what each layer's rank costs on the next ones (docs/findings.md, "In decode, where the savings are real"), how
much KL do uniform ranks, the static decode allocation (validation profile), random ranks, the self-profile teacher
(the prompt's own decode profile over its ``observe_tokens``, causal but costly) and hindsight (the scored tokens'
own profile: a ceiling) leave, and what share of the hindsight headroom over static does the teacher capture?
Each policy plays the env's episodes (``oracle.kvcache``), so every number is the env's reward; an agent trained in
the env has the teacher to beat and the ceiling above it.

    python -m experiments.kvcache_policies [--prompts 8] [--budgets 0.75 0.6] [--split test] [--context 1024]

Prints per budget: each policy's mean KL per token, on how many prompts it is below static, its headroom captured
``(KL_static - KL) / (KL_static - KL_hindsight)``, the key cache it used and what its decision costs.
``--agents FILE ...`` adds trained agents (``train_agent.py --preset kvcache``). The comparison is the key-cache
task's command, ``python -m agents.evaluate --env DRRL-KVCache-v0`` (:mod:`agents.kv_evaluate`, which takes every
other option: ``--context``, ``--corpus``, ``--out`` ...); this keeps the question's defaults.
"""

from __future__ import annotations

import argparse
import sys

from agents.kv_evaluate import main as kv_evaluate
from oracle.kvcache import KV_POLICIES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", nargs="+", default=list(KV_POLICIES), help="rules of oracle.kvcache")
    parser.add_argument("--agents", nargs="*", default=[], help="agent files (.safetensors) trained in the env")
    parser.add_argument("--prompts", type=int, default=8, help="prompts scored (the first of the split)")
    parser.add_argument("--out", default="results/kvcache_policies", help="folder of table.md and comparison.csv")
    args, rest = parser.parse_known_args(argv)
    policies = ["--policies", *args.policies, *args.agents]
    return kv_evaluate([*policies, "--prompts", str(args.prompts), "--out", args.out, *rest])


if __name__ == "__main__":
    sys.exit(main())
