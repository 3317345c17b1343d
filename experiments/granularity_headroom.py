"""Per-input headroom at three granularities: a rank per layer, per key/value head, per query segment.

Issue 14 asks where per-input allocation can pay most. ``experiments/measure_headroom.py`` measured
it with one rank per layer; this script measures the same ceiling with finer units, side by side
in one run: for each granularity, the label-free KL profile of every unit at every candidate rank
(:func:`drrl_env.profiles.kl.unit_kl_profile`: one key/value head group, or one query segment, of one
layer alone at the rank, everything else at full attention), water-filled at each budget of
logit FLOPs (:func:`drrl_env.profiles.waterfill.allocate_ranks`; a segment's share is weighted by its
logit FLOPs, queries x visible keys), by

- ``uniform``: the largest candidate within the budget in every layer;
- ``static``: the profile averaged over validation chunks (no input seen);
- ``hindsight``: each test chunk's own profile (label-free, but in-sample: a ceiling, and the
  finer the units, the more of it can be noise fit to the chunk).

Every allocation is scored on the test chunk by the mean per-token KL from the full model and by
the perplexity (reported only). Every granularity runs the same query segments (``--segment-len``),
so the spectra a unit is truncated with are the same in all three.

    python experiments/granularity_headroom.py --chunks 8 --validation-chunks 6 --seq-len 256 --segment-len 64
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from drrl_env.attention.hook import install, segment_spans
from drrl_env.lm.corpora import corpus_tokens, sequential_chunks
from drrl_env.lm.models import DEFAULT_MODEL, load_causal_lm
from drrl_env.lm.scoring import lm_loss, replay_scores
from drrl_env.profiles.kl import unit_kl_profile
from drrl_env.profiles.waterfill import allocate_ranks, rank_shares

GRANULARITIES = ("layer", "head", "segment")


def profile(loaded, ids: torch.Tensor, args: argparse.Namespace, granularity: str) -> np.ndarray:
    """``(L, U, K)`` unit KL profile of ``ids`` at ``granularity``."""
    per_head, per_segment = granularity == "head", granularity == "segment"
    return unit_kl_profile(loaded, ids, tuple(args.ranks), args.mode, args.segment_len, per_head, per_segment)


def unit_weights(granularity: str, layers: int, units: int, seq_len: int, segment_len: int) -> np.ndarray:
    """``(L * U,)`` relative logit FLOPs of each unit (mean 1): a segment's queries times the keys they see."""
    if granularity != "segment":
        return np.ones(layers * units)
    flops = np.asarray([(stop - start) * stop for start, stop in segment_spans(seq_len, segment_len)], dtype=float)
    return np.tile(flops / flops.mean(), layers)


def as_layer_ranks(chosen: list[int], ranks: tuple[int, ...], granularity: str, layers: int) -> tuple:
    """The :class:`~drrl_env.lm.scoring.LayerRanksHandler` spec of an allocation of ``L * U`` candidate indices."""
    table = np.asarray(ranks)[np.asarray(chosen)].reshape(layers, -1)
    if granularity == "head":
        return tuple(torch.as_tensor(row) for row in table)
    if granularity == "segment":
        return tuple(tuple(int(rank) for rank in row) for row in table)
    return tuple(int(row[0]) for row in table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="causal LM (default: the offline default)")
    parser.add_argument("--corpus", default="wiki", help="corpus of the validation and test chunks")
    parser.add_argument("--chunks", type=int, default=8, help="test chunks (one sequence each)")
    parser.add_argument("--validation-chunks", type=int, default=6, help="validation chunks of the static profiles")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per chunk")
    parser.add_argument("--segment-len", type=int, default=64, help="query segment length (every granularity)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 24, 32, 40, 48, 56, 64], help="candidates")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.625, 0.5], help="logit FLOPs shares")
    parser.add_argument("--mode", default="joint", help="spectral mode")
    parser.add_argument("--granularities", nargs="+", default=list(GRANULARITIES), choices=GRANULARITIES)
    args = parser.parse_args(argv)
    args.ranks = sorted(args.ranks)
    torch.manual_seed(0)
    loaded = load_causal_lm(args.model, device="cpu")
    layers, d = loaded.attention_shape.num_layers, loaded.attention_shape.head_dim
    flops = rank_shares(tuple(args.ranks), d)
    validation = sequential_chunks(corpus_tokens(args.corpus, "validation", loaded.tokenizer), args.seq_len)
    test = sequential_chunks(corpus_tokens(args.corpus, "test", loaded.tokenizer), args.seq_len)[: args.chunks]
    start = time.time()
    static, seconds = {}, {}
    for granularity in args.granularities:
        began = time.time()
        rows = [profile(loaded, ids[None], args, granularity) for ids in validation[: args.validation_chunks]]
        static[granularity] = np.mean(rows, axis=0)
        seconds[granularity] = (time.time() - began) / len(rows)
        print(f"{granularity}: static profile {static[granularity].shape}, {seconds[granularity]:.1f} s per chunk")
    results: dict[tuple[float, str], list[tuple[float, float]]] = {}
    stability: dict[str, list[float]] = {granularity: [] for granularity in args.granularities}
    full_losses = []
    for ids in tqdm(test.split(1), desc="test chunks"):
        with torch.no_grad(), install(loaded.model).use(None, args.segment_len):
            full_logits = loaded.model(input_ids=ids).logits
        full_losses.append(lm_loss(full_logits, ids))
        for budget in args.budgets:
            uniform = max(k for k in range(len(args.ranks)) if flops[k] <= budget + 1e-12)
            results.setdefault((budget, "uniform"), []).append(
                replay_scores(loaded, ids, [args.ranks[uniform]] * layers, args.mode, full_logits, args.segment_len)
            )
        for granularity in args.granularities:
            own = profile(loaded, ids, args, granularity)
            units = own.shape[1]
            stability[granularity].append(np.corrcoef(own.ravel(), static[granularity].ravel())[0, 1])
            weights = unit_weights(granularity, layers, units, args.seq_len, args.segment_len)
            for budget in args.budgets:
                for name, cost in (("static", static[granularity]), ("hindsight", own)):
                    chosen = allocate_ranks(cost.reshape(layers * units, -1), flops, budget, weights)
                    assert np.mean(weights * flops[chosen]) <= budget + 1e-9, (granularity, name, budget)
                    spec = as_layer_ranks(chosen, args.ranks, granularity, layers)
                    results.setdefault((budget, f"{name} per {granularity}"), []).append(
                        replay_scores(loaded, ids, spec, args.mode, full_logits, args.segment_len)
                    )
    full_ppl = math.exp(np.mean(full_losses))
    print(f"\nmodel={args.model} corpus={args.corpus} mode={args.mode} test chunks={len(test)}x{args.seq_len}, "
          f"segments of {args.segment_len}; full PPL {full_ppl:.3f}; {time.time() - start:.0f} s")  # fmt: skip
    for granularity in args.granularities:
        print(f"{granularity}: profile {seconds[granularity]:.1f} s per chunk; test chunk vs validation mean "
              f"r={np.mean(stability[granularity]):.2f}")  # fmt: skip
    print("| budget | policy | KL/token | PPL | ΔPPL % vs full | hindsight's KL below static |")
    print("|---|---|---|---|---|---|")
    for budget in args.budgets:
        names = ["uniform"] + [f"{n} per {g}" for g in args.granularities for n in ("static", "hindsight")]
        kl = {name: float(np.mean([r[0] for r in results[(budget, name)]])) for name in names}
        for name in names:
            ppl = math.exp(np.mean([r[1] for r in results[(budget, name)]]))
            gap = ""
            if name.startswith("hindsight"):
                reference = kl[name.replace("hindsight", "static")]
                gap = f"{100 * (1 - kl[name] / reference):.0f} %"
            print(f"| {budget:g} | {name} | {kl[name]:.5f} | {ppl:.3f} | {100 * (ppl / full_ppl - 1):+.2f} | {gap} |")


if __name__ == "__main__":
    main()
