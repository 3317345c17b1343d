"""Perplexity of a causal LM with its attention routed through a drrl handler.

``python -m drrl_env.perplexity`` compares full attention with fixed-rank low-rank attention in
both spectral modes on held-out text, and prints PPL and the attention FLOPs ratio. With
``--key-bases`` it adds the key bases of the low-rank key cache (``drrl_env.generate``:
``separate``, ``joint`` per key/value group, ``calibrated``), each sequence being its own prompt.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from drrl_env.calibration import attach_calibration
from drrl_env.cli import at_least
from drrl_env.corpora import (
    BUILTIN_CORPORA,
    DEFAULT_CORPUS,
    SPLITS,
    CorpusNotAvailableError,
    corpus_tokens,
    sequential_chunks,
)
from drrl_env.flops import full_attention_flops, key_cache_generation_flops, low_rank_attention_flops
from drrl_env.generate import calibrated_bases, rank_table
from drrl_env.hook import AttentionCall, Handler, install
from drrl_env.kv_attention import SINK_TOKENS, KeyBasisAttention
from drrl_env.kv_basis import BASIS_KINDS
from drrl_env.lowrank import SPECTRAL_MODES, SpectralMode
from drrl_env.models import DEFAULT_MODEL, LoadedModel, ModelNotAvailableError, load_causal_lm, resolve_device
from drrl_env.reward import lm_loss, next_token_kl


@dataclass(frozen=True)
class FixedRank:
    """Handler that runs every layer and segment at one rank in one spectral mode."""

    rank: int
    mode: SpectralMode = "separate"

    def __call__(self, call: AttentionCall) -> torch.Tensor:
        return call.low_rank(self.rank, self.mode)


@dataclass(frozen=True)
class LayerRanks:
    """Handler that runs layer ``l`` at ``ranks[l]`` (segment ``s`` at ``ranks[l][s]`` if a sequence); None: full.

    Replays a policy's rank choices in a plain forward pass (no env), e.g. to time them.
    """

    ranks: tuple
    mode: SpectralMode = "separate"

    def __call__(self, call: AttentionCall) -> torch.Tensor:
        rank = self.ranks[call.layer]
        if isinstance(rank, (tuple, list)):
            rank = rank[call.segment]
        return call.full() if rank is None else call.low_rank(rank, self.mode)


@torch.no_grad()
def replay_output(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    ranks: tuple,
    mode: SpectralMode,
    segment_len: int | None = None,
    output_hidden_states: bool = False,
):
    """The model's output on ``input_ids`` with the :class:`LayerRanks` ``ranks`` replayed.

    ``.logits``, and with ``output_hidden_states`` ``.hidden_states``: the residual stream entering each layer and
    after the last.
    """
    with install(loaded.model).use(LayerRanks(tuple(ranks), mode), segment_len):
        return loaded.model(input_ids=input_ids.to(loaded.device), output_hidden_states=output_hidden_states)


def replay_logits(
    loaded: LoadedModel, input_ids: torch.Tensor, ranks: tuple, mode: SpectralMode, segment_len: int | None = None
) -> torch.Tensor:
    """``(B, n, V)`` logits of ``input_ids`` with the :class:`LayerRanks` ``ranks`` replayed."""
    return replay_output(loaded, input_ids, ranks, mode, segment_len).logits


def replay_scores(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    ranks: tuple,
    mode: SpectralMode,
    full_logits: torch.Tensor,
    segment_len: int | None = None,
) -> tuple[float, float]:
    """(mean per-token KL from ``full_logits``, LM loss) of ``input_ids`` with the :class:`LayerRanks` ``ranks``."""
    logits = replay_logits(loaded, input_ids, ranks, mode, segment_len)
    return next_token_kl(full_logits, logits), lm_loss(logits, input_ids.to(loaded.device))


@dataclass(frozen=True)
class PerplexityResult:
    """Summed next-token negative log-likelihood (nats) over ``tokens`` predicted tokens."""

    nll_sum: float
    tokens: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


@torch.no_grad()
def sequence_nll(
    loaded: LoadedModel, input_ids: torch.Tensor, handler: Handler | None = None, segment_len: int | None = None
) -> torch.Tensor:
    """Per-sequence summed next-token NLL ``(B,)`` of ``input_ids (B, n)`` with attention through ``handler``."""
    hook = install(loaded.model)
    input_ids = input_ids.to(loaded.device)
    with hook.use(handler, segment_len):
        logits = loaded.model(input_ids=input_ids).logits  # (B, n, V)
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="none"
    )
    return losses.view(input_ids.shape[0], -1).sum(dim=1)


def forward_seconds(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    handler: Handler | None = None,
    segment_len: int | None = None,
    repeats: int = 2,
) -> float:
    """Best wall-clock seconds of :func:`sequence_nll` over ``repeats`` runs, after one warm-up run."""
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)
    best = math.inf
    for _ in range(repeats + 1):
        sync()
        start = time.perf_counter()
        sequence_nll(loaded, input_ids, handler, segment_len)
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def evaluate_perplexity(
    loaded: LoadedModel,
    chunks: torch.Tensor,
    handler: Handler | None = None,
    batch_size: int = 4,
    segment_len: int | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity over ``chunks (N, n)``, each chunk its own context (no carry-over between chunks)."""
    nll, count = 0.0, 0
    starts = range(0, chunks.shape[0], batch_size)
    for start in tqdm(starts, desc="perplexity", disable=not progress, leave=False):
        batch = chunks[start : start + batch_size]
        nll += float(sequence_nll(loaded, batch, handler, segment_len).sum())
        count += batch.numel() - batch.shape[0]
    return PerplexityResult(nll_sum=nll, tokens=count)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m drrl_env.perplexity",
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
            result = evaluate_perplexity(loaded, chunks, FixedRank(rank, mode), args.batch_size, progress=True)
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
