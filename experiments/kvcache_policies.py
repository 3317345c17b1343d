"""DRRL-KVCache-v0's fixed rules, teacher and ceiling, at equal key-cache bytes on held-out prompts.

Question: in the key-cache env, where a prompt's own decode profile over its first generated tokens predicted
what each layer's rank costs on the next ones (docs/findings.md, "In decode, where the savings are real"), how
much KL do uniform ranks, the static decode allocation (validation profile), random ranks, the self-profile teacher
(the prompt's own decode profile over its ``observe_tokens``, causal but costly) and hindsight (the scored tokens'
own profile: a ceiling) leave, and what share of the hindsight headroom over static does the teacher capture?
Each policy plays the env's episodes (``oracle.kvcache``), so every number is the env's reward; an agent trained in
the env has the teacher to beat and the ceiling above it.

    python -m experiments.kvcache_policies [--prompts 8] [--budgets 0.75 0.6] [--split test] [--context 1024]

Prints per budget (``agents.kv_evaluate``): each policy's mean KL per token, on how many prompts it is below
static, its headroom captured ``(KL_static - KL) / (KL_static - KL_hindsight)``, the key cache it used and what its
decision costs. ``--agents FILE ...`` adds trained agents (``train_agent.py --preset kvcache``).
"""

from __future__ import annotations

import argparse

import drrl_env  # noqa: F401  (registers DRRL-KVCache-v0)
from agents.kv_evaluate import kv_comparison, kv_markdown_table
from agents.zoo import make_policy
from drrl_env.kvcache import KVCacheConfig
from drrl_env.lm.corpora import DEFAULT_CORPUS
from drrl_env.lm.models import DEFAULT_MODEL
from oracle.kvcache import KV_POLICIES, kv_policy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="causal LM (default: the offline default)")
    parser.add_argument("--corpus", default=DEFAULT_CORPUS, help="text of the prompts")
    parser.add_argument("--split", default="test", help="split of the prompts (held out from the static profile)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts scored (the first of the split)")
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens")
    parser.add_argument("--observe-tokens", type=int, default=64, help="tokens generated before the commit")
    parser.add_argument("--horizon", type=int, default=64, help="tokens scored after the commit")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 48, 64], help="candidate ranks")
    parser.add_argument("--recent-tokens", type=int, default=64, help="exact recent-key window")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.6], help="key-cache shares")
    parser.add_argument("--policies", nargs="+", default=list(KV_POLICIES), choices=KV_POLICIES, help="policies")
    parser.add_argument("--agents", nargs="*", default=[], help="agent files (.safetensors) trained in the env")
    args = parser.parse_args(argv)
    config = KVCacheConfig(
        model=args.model, corpus=args.corpus, context=args.context, observe_tokens=args.observe_tokens,
        horizon=args.horizon, ranks=tuple(args.ranks), recent_tokens=args.recent_tokens,
    )  # fmt: skip
    kwargs = vars(config)
    policies = [kv_policy(name) for name in args.policies] + [make_policy(path, kwargs) for path in args.agents]
    rows = kv_comparison(policies, kwargs, args.prompts, args.budgets, args.split)
    print("\n" + kv_markdown_table(rows, kwargs, args.split))


if __name__ == "__main__":
    main()
