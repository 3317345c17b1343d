"""Does the observed tokens' attention KL say which layers' keys can lose rank? A cheap causal signal, measured.

Question: the relative logit error the key-cache agent observes ranks layers unlike their KL cost (its water-fill
leaves 1.8-2.3x static's KL, docs/findings.md "Where are the savings real?"). It weighs every key alike, while a
query's attention sits on few keys. The attention KL (``drrl_env.generation.decode_profile.observed_attention_kls``:
per layer and candidate rank, ``KL(softmax(s) || softmax(s'))`` of 16 observed queries' attention through the
layer's basis, exact at the sinks and in the recent window) weighs each key by its attention. Is it a better
signal, alone or as a per-prompt correction of the static decode allocation?

Method: on the first ``--prompts`` wiki test prompts of DRRL-KVCache-v0 (context 1024, 64 observed and 64 scored
tokens) at each budget, the episodes of (``agents.kv_evaluate.kv_comparison``): ``static`` (the water-fill of the
validation decode profile ``S``), ``attention_kl`` (the water-fill of the prompt's attention KL ``A``), and for each
``--alphas`` value a the water-fill of ``S * ((A + e) / (Abar + e))^a``, ``Abar`` the mean attention KL of
``--validation-prompts`` validation prompts (the prompt's deviation from the usual attention distortion, scaled by
what a layer's rank costs on validation text). ``--hindsight`` adds the ceiling for the headroom column.

    python -m experiments.attention_kl_rule [--prompts 4] [--alphas 1 0.5] [--hindsight]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from agents.kv_evaluate import kv_comparison, kv_markdown_table
from drrl_env.cli import add_env_arguments, env_kwargs
from drrl_env.generation.decode_profile import greedy_continuation, observed_attention_kls
from drrl_env.kvcache import KVCACHE_ENV_ID, DRRLKVCacheEnv
from drrl_env.lm.corpora import corpus_tokens, sequential_chunks
from oracle.kvcache import PlannedPolicy, kv_policy

FLOOR = 1e-7


def validation_attention_kls(env: DRRLKVCacheEnv, prompts: int) -> np.ndarray:
    """``(L, K)`` the mean attention KL of the first ``prompts`` validation prompts (their own observed tokens)."""
    cfg, loaded = env.config, env.loaded
    chunks = sequential_chunks(corpus_tokens(cfg.corpus, "validation", loaded.tokenizer), cfg.context)
    tables = []
    for prompt in chunks[:prompts]:
        prefix = torch.cat([prompt[None], greedy_continuation(loaded, prompt[None], cfg.observe_tokens)], dim=1)
        tables.append(observed_attention_kls(loaded, prefix, cfg.ranks, cfg.observe_tokens, cfg.basis,
                                             sink_tokens=cfg.sink_tokens, recent_tokens=cfg.recent_tokens))  # fmt: skip
    return np.mean(tables, axis=0)


def corrected_static(alpha: float, validation_prompts: int) -> PlannedPolicy:
    """The water-fill of ``S * ((A + e) / (Abar + e))^alpha`` (module docstring)."""
    mean: dict[str, np.ndarray] = {}

    def plan(env: DRRLKVCacheEnv) -> list[int]:
        if "A" not in mean:
            mean["A"] = validation_attention_kls(env, validation_prompts)
        ratio = (env.observed_attention_kls() + FLOOR) / (mean["A"] + FLOOR)
        return env.waterfill_plan(env.static_profile() * ratio**alpha)

    return PlannedPolicy(f"static x attention^{alpha:g}", plan)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.6], help="key-cache shares")
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.5], help="powers of the correction")
    parser.add_argument("--validation-prompts", type=int, default=4, help="prompts of the validation mean")
    parser.add_argument("--hindsight", action="store_true", help="add the ceiling (a decode profile per prompt)")
    add_env_arguments(parser, KVCACHE_ENV_ID, [KVCACHE_ENV_ID], split="test", prompts=4)
    args = parser.parse_args(argv)
    kwargs = env_kwargs(vars(args))
    policies = [kv_policy("static"), kv_policy("attention_kl")]
    policies += [corrected_static(alpha, args.validation_prompts) for alpha in args.alphas]
    policies += [kv_policy("hindsight")] if args.hindsight else []
    rows = kv_comparison(policies, kwargs, kwargs["prompts"], sorted(set(args.budgets), reverse=True))
    print("\n" + kv_markdown_table(rows, kwargs))


if __name__ == "__main__":
    main()
