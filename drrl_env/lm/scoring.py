"""Perplexity of a causal LM with its attention routed through a drrl handler.

``python -m agents.perplexity`` compares full attention with fixed-rank low-rank attention in
both spectral modes on held-out text, and prints PPL and the attention FLOPs ratio. With
``--key-bases`` it adds the key bases of the low-rank key cache (``drrl_env.generation.decode``:
``separate``, ``joint`` per key/value group, ``calibrated``), each sequence being its own prompt.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from drrl_env.attention.hook import AttentionCall, Handler, install
from drrl_env.attention.lowrank import SpectralMode
from drrl_env.lm.models import LoadedModel


@dataclass(frozen=True)
class FixedRankHandler:
    """Handler that runs every layer and segment at one rank in one spectral mode."""

    rank: int
    mode: SpectralMode = "separate"

    def __call__(self, call: AttentionCall) -> torch.Tensor:
        return call.low_rank(self.rank, self.mode)


@dataclass(frozen=True)
class LayerRanksHandler:
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
    """The model's output on ``input_ids`` with the :class:`LayerRanksHandler` ``ranks`` replayed.

    ``.logits``, and with ``output_hidden_states`` ``.hidden_states``: the residual stream entering each layer and
    after the last.
    """
    with install(loaded.model).use(LayerRanksHandler(tuple(ranks), mode), segment_len):
        return loaded.model(input_ids=input_ids.to(loaded.device), output_hidden_states=output_hidden_states)


def replay_logits(
    loaded: LoadedModel, input_ids: torch.Tensor, ranks: tuple, mode: SpectralMode, segment_len: int | None = None
) -> torch.Tensor:
    """``(B, n, V)`` logits of ``input_ids`` with the :class:`LayerRanksHandler` ``ranks`` replayed."""
    return replay_output(loaded, input_ids, ranks, mode, segment_len).logits


def replay_scores(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    ranks: tuple,
    mode: SpectralMode,
    full_logits: torch.Tensor,
    segment_len: int | None = None,
) -> tuple[float, float]:
    """(mean per-token KL from ``full_logits``, LM loss) of ``input_ids`` with :class:`LayerRanksHandler` ``ranks``."""
    logits = replay_logits(loaded, input_ids, ranks, mode, segment_len)
    scores = next_token_scores(full_logits, logits, input_ids.to(loaded.device))
    return scores.kl, scores.lm_loss


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


_BLOCK_BYTES = 1 << 20
"""on the CPU the scores run over blocks of about this many bytes of logits per tensor (a few rows of a large
vocabulary), which stay in cache between their passes: 3x faster than whole-tensor passes at V = 49152"""


def _row_blocks(logits: torch.Tensor) -> range:
    """Start rows of the blocks :func:`next_token_scores` works in (one block on an accelerator)."""
    rows, vocab = logits.shape[0], logits.shape[-1]
    step = rows if logits.device.type != "cpu" else max(1, _BLOCK_BYTES // (4 * vocab))
    return range(0, rows, step)


@dataclass(frozen=True)
class NextTokenScores:
    """What a low-rank forward pass scores against the full model's on the same tokens (nats, per token).

    Attributes:
        kl: mean ``KL(p_full || p_low)`` over every position.
        lm_loss: mean next-token cross-entropy of the low-rank logits (HF's LM loss).
        lm_loss_full: the same of the full logits.
    """

    kl: float
    lm_loss: float
    lm_loss_full: float


def _kl_and_lse(logits_full: torch.Tensor, logits_low: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-token ``KL(p_full || p_low)``, ``logsumexp`` of the full and of the low logits, each ``(B, n)``."""
    z_p, z_q = logits_full.flatten(0, -2), logits_low.flatten(0, -2)  # (B*n, V)
    kl, lse_p, lse_q = (torch.empty(z_p.shape[0], device=z_p.device) for _ in range(3))
    blocks = _row_blocks(z_p)
    for start in blocks:
        rows = slice(start, start + blocks.step)
        p_block, q_block = z_p[rows].float(), z_q[rows].float()
        lse_p[rows], lse_q[rows] = p_block.logsumexp(-1), q_block.logsumexp(-1)
        p = (p_block - lse_p[rows].unsqueeze(-1)).exp_()
        # sum_v p (log p - log q) = sum_v p (z_p - z_q) - lse_p + lse_q
        kl[rows] = torch.linalg.vecdot(p, p_block - q_block) - lse_p[rows] + lse_q[rows]
    shape = logits_full.shape[:-1]
    return kl.clamp_min(0.0).view(shape), lse_p.view(shape), lse_q.view(shape)


def _cross_entropy(logits: torch.Tensor, lse: torch.Tensor, input_ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy of ``(B, n, V)`` logits whose ``logsumexp`` is ``lse (B, n)``."""
    target = logits[:, :-1].gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1).float()  # (B, n-1)
    return float((lse[:, :-1] - target).double().mean())


def next_token_scores(logits_full: torch.Tensor, logits_low: torch.Tensor, input_ids: torch.Tensor) -> NextTokenScores:
    """KL from the full logits and both LM losses of ``(B, n, V)`` logits on ``input_ids (B, n)``, in one pass.

    The same numbers as :func:`next_token_kl` and :func:`lm_loss` twice, each ``logsumexp`` computed once.
    """
    kl, lse_p, lse_q = _kl_and_lse(logits_full, logits_low)
    return NextTokenScores(
        kl=float(kl.double().mean()),
        lm_loss=_cross_entropy(logits_low, lse_q, input_ids),
        lm_loss_full=_cross_entropy(logits_full, lse_p, input_ids),
    )


def next_token_kl(logits_full: torch.Tensor, logits_low: torch.Tensor) -> float:
    """Mean per-token ``KL(p_full || p_low)`` in nats over every position of ``(B, n, V)`` logits.

    In float32 (the logits' own precision; float64 costs seconds per episode at V = 49152): each
    token's KL is a sum of ``V`` terms, accurate to about ``1e-6`` nats (rounding that would make
    it negative is clamped at 0), and exactly 0 when the logits are equal.
    """
    kl, _, _ = _kl_and_lse(logits_full, logits_low)
    return float(kl.double().mean())


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats) of ``(B, n, V)`` logits on ``input_ids (B, n)`` (HF's LM loss)."""
    lse = torch.empty(logits.shape[:-1], device=logits.device)
    flat, lse_flat = logits.flatten(0, -2), lse.view(-1)
    blocks = _row_blocks(flat)
    for start in blocks:
        lse_flat[start : start + blocks.step] = flat[start : start + blocks.step].float().logsumexp(-1)
    return _cross_entropy(logits, lse, input_ids)
