"""DRRL-KVCache-v0's fixed rules, teacher and ceiling, at equal key-cache bytes on held-out prompts.

Question: in the key-cache env, where a prompt's own decode profile over its first generated tokens predicted
what each layer's rank costs on the next ones (docs/findings.md, "In decode, where the savings are real"), how
much KL do uniform ranks, the static decode allocation (validation profile), random ranks, the self-profile teacher
(the prompt's own decode profile over its ``observe_tokens``, causal but costly) and hindsight (the scored tokens'
own profile: a ceiling) leave, and what share of the hindsight headroom over static does the teacher capture?
Each policy plays the env's episodes (``oracle.kvcache``), so every number is the env's reward; an agent trained in
the env has the teacher to beat and the ceiling above it.

    python -m experiments.kvcache_policies [--prompts 8] [--budgets 0.75 0.6] [--split test] [--context 1024]

Prints per budget: each policy's mean KL per token, on how many prompts it is below static, and its headroom
captured ``(KL_static - KL) / (KL_static - KL_hindsight)``.
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np

import drrl_env  # noqa: F401  (registers DRRL-KVCache-v0)
from drrl_env.kvcache import KVCACHE_ENV_ID
from drrl_env.lm.corpora import DEFAULT_CORPUS
from drrl_env.lm.models import DEFAULT_MODEL
from oracle.kvcache import (
    KV_POLICIES,
    PlannedPolicy,
    hindsight_profile,
    kv_policy,
    play,
    self_profile,
    static_profile,
    waterfill,
)


def profile_of(name: str, prompt: int, env, profiles: dict) -> np.ndarray:
    """The ``(L, K)`` decode profile ``name`` water-fills on ``prompt``, measured once (``profiles`` keeps it)."""
    key = (name, None if name == "static" else prompt)  # the static profile is the same for every prompt
    if key not in profiles:
        measure = {"static": static_profile, "self_profile": self_profile, "hindsight": hindsight_profile}[name]
        profiles[key] = measure(env)
    return profiles[key]


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
    args = parser.parse_args(argv)
    env = gym.make(
        KVCACHE_ENV_ID, model=args.model, corpus=args.corpus, split=args.split, prompts=args.prompts,
        context=args.context, observe_tokens=args.observe_tokens, horizon=args.horizon, ranks=tuple(args.ranks),
        recent_tokens=args.recent_tokens, cache_budget=max(args.budgets), cached_prompts=args.prompts,
    ).unwrapped  # fmt: skip
    profiles: dict = {}
    kl = {(budget, name): [] for budget in args.budgets for name in args.policies}
    for prompt in range(args.prompts):
        for budget in args.budgets:
            for name in args.policies:
                env.reset(seed=prompt, options={"prompt": prompt, "budget": budget})
                if name in ("static", "self_profile", "hindsight"):  # each profile measured once, spent per budget
                    cost = profile_of(name, prompt, env, profiles)
                    policy = PlannedPolicy(lambda env, cost=cost: waterfill(env, cost))
                else:
                    policy = kv_policy(name, seed=prompt)
                kl[budget, name].append(play(env, policy)["kl"])
        print(f"prompt {prompt + 1}/{args.prompts} done", flush=True)
    print(f"\n{KVCACHE_ENV_ID}: {args.prompts} {args.corpus} {args.split} prompts of {args.context} tokens, "
          f"{args.observe_tokens} observed, {args.horizon} scored; KL per token from the full model\n")  # fmt: skip
    print("| budget | policy | mean KL | below static | headroom captured |\n|---|---|---|---|---|")
    for budget in args.budgets:
        static = np.asarray(kl.get((budget, "static"), [np.nan] * args.prompts))
        ceiling = np.asarray(kl.get((budget, "hindsight"), [np.nan] * args.prompts))
        for name in args.policies:
            values = np.asarray(kl[budget, name])
            below = int((values < static).sum()) if name != "static" else 0
            gap = static.mean() - ceiling.mean()
            captured = (static.mean() - values.mean()) / gap if gap > 0 else float("nan")
            print(f"| {budget:g} | {name} | {values.mean():.5f} | {below}/{args.prompts} | {captured:+.2f} |")


if __name__ == "__main__":
    main()
