"""Can the prefill predict a prompt's own decode profile? A label-free per-prompt allocation, measured.

Per-prompt key-cache ranks have real headroom in decode (docs/findings.md: each prompt's
own decode profile beats the static validation profile on every test prompt), but a prompt's own
profile costs one prefill per candidate rank. This script tests the cheapest per-prompt signal
there is: what the prefill computes anyway. For each prompt, layer ``l`` and candidate rank ``r``
the feature is the relative logit error of the prompt's last ``--window`` queries against its keys
with the layer's ``joint`` key basis at rank ``r`` (built from the whole prompt, as generation
builds it; sinks exact): the queries nearest the decode steps, meeting the basis decode uses
(:func:`drrl_env.generation.decode_profile.prefill_logit_errors`).

The predictor shrinks nothing it cannot fit: per candidate rank, the log deviation of a prompt's
decode KL from the mean profile is regressed on the log deviation of its feature from the mean
feature, over the training prompts (validation text). On test prompts, each allocation at the
same mean rank is scored by the KL of its teacher-forced continuation: uniform, static (the mean
of the training prompts' decode profiles), predicted (static corrected by the prompt's features)
and hindsight (the prompt's own decode profile over the continuation it is scored on: a ceiling).

    python experiments/decode_profile_predictor.py --context 1024 --train-prompts 16 --test-prompts 8
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from drrl_env.generation.decode import teacher_forced_logits
from drrl_env.generation.decode_profile import decode_kl_profile, greedy_continuation, prefill_logit_errors
from drrl_env.lm.corpora import corpus_tokens, sequential_chunks
from drrl_env.lm.models import DEFAULT_MODEL, load_causal_lm
from drrl_env.lm.scoring import next_token_kl
from drrl_env.profiles.waterfill import allocate_ranks, rank_shares

FLOOR = 1e-5
"""floor of a profile cell's KL (nats per token) and of a feature before their logs"""


def profiled(loaded, prompts: torch.Tensor, candidates: tuple, tokens: int, window: int, desc: str):
    """Per prompt: the ``(L, K)`` decode profile and the ``(2, L, K)`` prefill features (window, every query).

    Stacked: ``(P, L, K)`` and ``(P, 2, L, K)``.
    """
    costs, features = [], []
    for prompt in tqdm(prompts, desc=desc):
        costs.append(decode_kl_profile(loaded, prompt[None], candidates, tokens))
        features.append([prefill_logit_errors(loaded, prompt[None], candidates, window=w) for w in (window, None)])
    return np.stack(costs), np.asarray(features)


def log_deviation(x: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """``log(x + FLOOR) - log(centre + FLOOR)`` cell by cell."""
    return np.log(x + FLOOR) - np.log(centre + FLOOR)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="causal LM (default: the offline default)")
    parser.add_argument("--context", type=int, default=1024, help="prompt length (training and test)")
    parser.add_argument("--train-prompts", type=int, default=16, help="validation prompts: static profile and fit")
    parser.add_argument("--test-prompts", type=int, default=8, help="test prompts scored")
    parser.add_argument("--tokens", type=int, default=64, help="teacher-forced tokens per profile and per score")
    parser.add_argument("--window", type=int, default=64, help="last prompt queries the feature is measured on")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 48], help="candidate ranks below d")
    parser.add_argument("--mean-rank", type=float, default=31, help="mean rank of every allocation")
    parser.add_argument("--save", default=None, help="write the profiles and features to this .npz")
    args = parser.parse_args(argv)
    loaded = load_causal_lm(args.model)
    d = loaded.attention_shape.head_dim
    candidates = (*sorted({rank for rank in args.ranks if rank < d}), d)
    below = len(candidates) - 1
    start = time.time()

    def allocate(cost: np.ndarray) -> list[int]:
        return [candidates[k] for k in allocate_ranks(cost, rank_shares(candidates, d), args.mean_rank / d)]

    train = sequential_chunks(corpus_tokens("wiki", "validation", loaded.tokenizer), args.context)
    test = sequential_chunks(corpus_tokens("wiki", "test", loaded.tokenizer), args.context)
    train_cost, train_features = profiled(
        loaded, train[: args.train_prompts], candidates, args.tokens, args.window, "train"
    )
    test_cost, test_features = profiled(loaded, test[: args.test_prompts], candidates, args.tokens, args.window, "test")
    print(f"profiles and features ({time.time() - start:.0f} s)")
    if args.save:
        np.savez(
            args.save,
            train_cost=train_cost,
            train_features=train_features,
            test_cost=test_cost,
            test_features=test_features,
            candidates=np.asarray(candidates),
        )
    train_feature, test_feature = train_features[:, 0], test_features[:, 0]  # the window's

    static, mean_log_feature = train_cost.mean(axis=0), np.log(train_feature + FLOOR).mean(axis=0)

    def feature_deviation(feature: np.ndarray) -> np.ndarray:
        """``log(feature + FLOOR)`` from its mean over the training prompts, cell by cell (``(..., L, K)``)."""
        return np.log(feature + FLOOR) - mean_log_feature

    train_x, test_x = feature_deviation(train_feature), feature_deviation(test_feature)
    slopes = []
    for k in range(below):  # per candidate rank: y = slope * x through the origin
        x = train_x[:, :, k]
        y = log_deviation(train_cost[:, :, k], static[:, k])
        slopes.append(float((x * y).sum() / (x * x).sum()))
        fit = 1 - ((y - slopes[-1] * x) ** 2).sum() / (y * y).sum()
        x_test = test_x[:, :, k]
        y_test = log_deviation(test_cost[:, :, k], static[:, k])
        held = 1 - ((y_test - slopes[-1] * x_test) ** 2).sum() / (y_test * y_test).sum()
        corr = np.corrcoef(x_test.ravel(), y_test.ravel())[0, 1]
        print(f"rank {candidates[k]}: slope {slopes[-1]:.3f}, R2 train {fit:.3f}, test {held:.3f} (corr {corr:.3f})")

    names = [f"uniform {args.mean_rank:g}", "static (train mean)", "predicted (prefill feature)", "hindsight (own)"]
    rows = []
    for p, prompt in enumerate(tqdm(test[: args.test_prompts], desc="score")):
        predicted = static.copy()
        for k in range(below):
            predicted[:, k] = np.exp(np.log(static[:, k] + FLOOR) + slopes[k] * test_x[p, :, k]) - FLOOR
        specs = [round(args.mean_rank), allocate(static), allocate(predicted), allocate(test_cost[p])]
        continuation = greedy_continuation(loaded, prompt[None], args.tokens)
        reference = teacher_forced_logits(loaded, prompt[None], continuation, "full")
        rows.append(
            [next_token_kl(reference, teacher_forced_logits(loaded, prompt[None], continuation, s)) for s in specs]
        )
    rows = np.asarray(rows).T
    for name, row in zip(names, rows, strict=True):
        wins = int((row < rows[1]).sum())
        print(f"{name}: {np.round(row, 4).tolist()} mean {row.mean():.4f} (below static on {wins}/{row.size})")
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
