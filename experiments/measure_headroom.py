"""How much can per-input rank allocation pay? The hindsight ceiling against uniform and static, at equal FLOPs.

On held-out chunks (the test split), for each spectral mode, every policy allocates one rank per
layer within a budget of logit FLOPs (a layer at rank ``r`` costs ``r / d``; the env's
``flops_budget`` unit) and is scored by the mean per-token KL of the next-token distribution from
the full model's, and by the perplexity (reported only; no choice sees labels):

- ``uniform``: the largest candidate rank within the budget, in every layer;
- ``static``: the water-fill of the layer KL profile averaged over validation chunks;
- ``hindsight``: the water-fill of each test chunk's own layer KL profile (label-free);
- ``hindsight:fisher``: the same on the profile's Fisher estimate (:mod:`drrl_env.profiles.sensitivity`), with how
  well it ranks the exact profile's cells (Spearman) and what it costs.

The hindsight allocation is optimal under the additive model (the KL of several layers at
once is about the sum of their single-layer KLs), so ``static - hindsight`` is the headroom an
input-adaptive policy can aim at. Also reported: how stable the profiles are (Pearson correlation
of the flattened layer x rank profiles between test chunks, and between the validation mean and
each test chunk), and the "captured" share of the headroom that static has over uniform.

    python experiments/measure_headroom.py [--chunks 10] [--validation-chunks 8] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import itertools
import math
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from drrl_env.attention.hook import install
from drrl_env.lm.corpora import corpus_tokens, sequential_chunks
from drrl_env.lm.models import DEFAULT_MODEL, load_causal_lm
from drrl_env.lm.scoring import lm_loss, replay_scores
from drrl_env.profiles.kl import FISHER_SAMPLES, layer_kl_profile
from drrl_env.profiles.sensitivity import fisher_kl_profile
from drrl_env.profiles.validation import validation_profile
from drrl_env.profiles.waterfill import allocate_ranks, rank_shares


def mean_offdiagonal_correlation(rows: np.ndarray) -> float:
    pairs = [np.corrcoef(a, b)[0, 1] for a, b in itertools.combinations(rows, 2)]
    return float(np.mean(pairs))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--corpus", default="wiki")
    parser.add_argument("--chunks", type=int, default=10, help="test chunks (one batch of one sequence each)")
    parser.add_argument("--validation-chunks", type=int, default=8, help="validation chunks of the static profile")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 24, 32, 40, 48, 56, 64])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.625, 0.5])
    parser.add_argument("--modes", nargs="+", default=["joint", "separate"])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    loaded = load_causal_lm(args.model, device="cpu")
    ranks = tuple(sorted(args.ranks))
    d = loaded.attention_shape.head_dim
    flops = rank_shares(ranks, d)
    chunks = sequential_chunks(corpus_tokens(args.corpus, "test", loaded.tokenizer), args.seq_len)[: args.chunks]
    hook = install(loaded.model)
    print(f"model={args.model} corpus={args.corpus} test chunks={len(chunks)}x{args.seq_len} ranks={ranks}")
    for mode in args.modes:
        start = time.perf_counter()
        static_cost, _ = validation_profile(
            args.model, args.corpus, args.seq_len, None, ranks, mode, "cpu",
            args.validation_chunks * args.seq_len, True,
        )  # fmt: skip
        static_seconds = time.perf_counter() - start
        results: dict[tuple[float, str], list[tuple[float, float]]] = {}
        profiles, full_losses, profile_seconds, fisher_seconds, spearman, agreement = [], [], [], [], [], []
        policies = ("uniform", "static", "hindsight", "hindsight:fisher")
        for ids in chunks.split(1):
            with torch.no_grad(), hook.use(None):
                full_logits = loaded.model(input_ids=ids).logits
            full_losses.append(lm_loss(full_logits, ids))
            start = time.perf_counter()
            profile = layer_kl_profile(loaded, ids, ranks, mode)
            profile_seconds.append(time.perf_counter() - start)
            profiles.append(profile)
            start = time.perf_counter()
            estimate = fisher_kl_profile(loaded, ids, ranks, mode, samples=FISHER_SAMPLES)
            fisher_seconds.append(time.perf_counter() - start)
            spearman.append(spearmanr(profile[:, :-1].ravel(), estimate[:, :-1].ravel())[0])
            for budget in args.budgets:
                uniform = max(k for k in range(len(ranks)) if flops[k] <= budget + 1e-12)
                choices = {
                    "uniform": [uniform] * len(profile),
                    "static": allocate_ranks(static_cost, flops, budget),
                    "hindsight": allocate_ranks(profile, flops, budget),
                    "hindsight:fisher": allocate_ranks(estimate, flops, budget),
                }
                agreement.append(np.mean(np.equal(choices["hindsight"], choices["hindsight:fisher"])))
                for name, chosen in choices.items():
                    assert np.mean(flops[chosen]) <= budget + 1e-9, (name, budget)
                    results.setdefault((budget, name), []).append(
                        replay_scores(loaded, ids, [ranks[k] for k in chosen], mode, full_logits)
                    )
        full_ppl = math.exp(np.mean(full_losses))
        flat = np.stack([p.ravel() for p in profiles])
        to_validation = np.mean([np.corrcoef(static_cost.ravel(), f)[0, 1] for f in flat])
        middle = int(np.argmin(np.abs(np.asarray(ranks) - d / 2)))  # per-layer sensitivity at rank d/2
        layers = np.stack([p[:, middle] for p in profiles])
        layers_to_validation = np.mean([np.corrcoef(static_cost[:, middle], row)[0, 1] for row in layers])
        print(f"\n## mode={mode}: full-model PPL {full_ppl:.3f} on the test chunks")
        print(
            f"profile stability: test chunk vs test chunk r={mean_offdiagonal_correlation(flat):.2f}; "
            f"validation mean vs test chunk r={to_validation:.2f}; per-layer KL at rank {ranks[middle]}: "
            f"chunk vs chunk r={mean_offdiagonal_correlation(layers):.2f}, "
            f"validation vs chunk r={layers_to_validation:.2f}; "
            f"hindsight profile {np.mean(profile_seconds):.1f} s per chunk, static profile {static_seconds:.0f} s"
        )
        print(
            f"Fisher estimate ({FISHER_SAMPLES} samples): {np.mean(fisher_seconds):.1f} s per chunk; cell Spearman "
            f"with the exact profile {np.mean(spearman):.3f} (min {np.min(spearman):.3f}); same rank as the exact "
            f"allocation in {100 * np.mean(agreement):.0f} % of layers"
        )
        print("| budget | policy | KL/token | PPL | ΔPPL % vs full | headroom captured |")
        print("|---|---|---|---|---|---|")
        for budget in args.budgets:
            kl = {name: np.mean([r[0] for r in results[(budget, name)]]) for name in policies}
            best_fixed = min(kl["uniform"], kl["static"])
            for name in policies:
                ppl = math.exp(np.mean([r[1] for r in results[(budget, name)]]))
                gap = kl["uniform"] - kl["hindsight"]
                captured = (kl["uniform"] - kl[name]) / gap if gap > 0 else float("nan")
                print(
                    f"| {budget:g} | {name} | {kl[name]:.4f} | {ppl:.3f} | {100 * (ppl / full_ppl - 1):+.2f} | "
                    f"{captured:.2f} of uniform→hindsight |"
                )
            print(f"| {budget:g} | headroom over best fixed | {best_fixed - kl['hindsight']:.4f} | | | |")


if __name__ == "__main__":
    main()
