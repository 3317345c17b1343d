"""Perplexity of fixed ranks in every spectral mode on a corpus's test split: ``python -m agents.perplexity``."""

from __future__ import annotations

import argparse
import sys

from drrl_env.attention.flops import full_attention_flops, key_cache_generation_flops, low_rank_attention_flops
from drrl_env.attention.kv_basis import BASIS_KINDS
from drrl_env.attention.lowrank import SPECTRAL_MODES
from drrl_env.cli import at_least
from drrl_env.generation.decode import calibrated_bases, rank_table
from drrl_env.generation.kv_attention import SINK_TOKENS, KeyBasisAttention
from drrl_env.lm.corpora import (
    BUILTIN_CORPORA,
    DEFAULT_CORPUS,
    SPLITS,
    CorpusNotAvailableError,
    corpus_tokens,
    sequential_chunks,
)
from drrl_env.lm.models import DEFAULT_MODEL, ModelNotAvailableError, load_causal_lm, resolve_device
from drrl_env.lm.scoring import FixedRankHandler, evaluate_perplexity
from drrl_env.profiles.calibration import attach_calibration


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m agents.perplexity",
        description="Perplexity of a causal LM with full attention and with fixed-rank low-rank attention "
        "(every layer at one rank), in both spectral modes, on held-out text.",
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="model: the offline default, a local folder, or a hub id"
    )
    parser.add_argument(
        "--corpus", default=DEFAULT_CORPUS, help=f"corpus: one of {BUILTIN_CORPORA}, a local file, or a hub dataset"
    )
    parser.add_argument("--split", default="test", choices=SPLITS, help="corpus split to evaluate on (default: test)")
    parser.add_argument(
        "--seq-len", type=at_least(2), default=512, help="tokens per evaluated sequence (its whole context)"
    )
    parser.add_argument(
        "--max-tokens", type=at_least(2), default=8192, help="evaluate on at most this many tokens of the split"
    )
    parser.add_argument("--batch-size", type=at_least(1), default=4, help="sequences per forward pass")
    parser.add_argument(
        "--ranks", type=at_least(1), nargs="+", default=[16, 32, 48], help="fixed ranks to evaluate (<= head dim)"
    )
    parser.add_argument(
        "--modes", nargs="+", choices=SPECTRAL_MODES, default=list(SPECTRAL_MODES), help="spectral modes (default: all)"
    )
    parser.add_argument(
        "--key-bases", nargs="*", choices=BASIS_KINDS, default=[], help="key bases of the low-rank key cache to add"
    )
    parser.add_argument(
        "--sink-tokens", type=at_least(0), default=SINK_TOKENS, help="with --key-bases: first tokens kept exact"
    )
    parser.add_argument("--device", default="auto", help="'auto' (CUDA if present), 'cpu' or 'cuda'")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        loaded = load_causal_lm(args.model, device=str(resolve_device(args.device)))
        tokens = corpus_tokens(args.corpus, args.split, loaded.tokenizer)
        chunks = sequential_chunks(tokens, args.seq_len, args.max_tokens)
        if max(args.ranks) > loaded.attention_shape.head_dim:
            raise ValueError(f"--ranks must be <= the head dim {loaded.attention_shape.head_dim}, got {args.ranks}")
    except (ValueError, ModelNotAvailableError, CorpusNotAvailableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if "calibrated" in args.modes:
        attach_calibration(loaded)
    shape = loaded.attention_shape
    heads, kv_heads, head_dim = shape.q_heads, shape.kv_heads, shape.head_dim
    full_flops = full_attention_flops(1, heads, args.seq_len, args.seq_len, head_dim).total
    rows = [("full", "-", evaluate_perplexity(loaded, chunks, None, args.batch_size, progress=True), 1.0, 1.0)]
    for mode in args.modes:
        for rank in args.ranks:
            flops = low_rank_attention_flops(1, heads, kv_heads, args.seq_len, args.seq_len, head_dim, rank, mode)
            result = evaluate_perplexity(loaded, chunks, FixedRankHandler(rank, mode), args.batch_size, progress=True)
            rows.append((f"r={rank}", mode, result, flops.core / full_flops, flops.total / full_flops))
    for basis in args.key_bases:
        for rank in args.ranks:
            table = rank_table(rank, shape)
            calibrated = calibrated_bases(loaded, table) if basis == "calibrated" else None
            handler = KeyBasisAttention(table, basis, calibrated, sink_tokens=args.sink_tokens)
            flops = key_cache_generation_flops(1, heads, kv_heads, args.seq_len, 0, head_dim, rank, basis).prefill
            result = evaluate_perplexity(loaded, chunks, handler, args.batch_size, progress=True)
            rows.append((f"r={rank}", f"key:{basis}", result, flops.core / full_flops, flops.total / full_flops))
    print(f"model={args.model} corpus={args.corpus}/{args.split} tokens={chunks.numel()} seq_len={args.seq_len}")
    print(f"{'attention':<10} {'mode':<14} {'PPL':>8} {'FLOPs core':>11} {'FLOPs +overhead':>16}")
    for name, mode, result, core, total in rows:
        print(f"{name:<10} {mode:<14} {result.perplexity:>8.2f} {core:>11.3f} {total:>16.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
