"""FLOPs model of one layer's attention core, full and low-rank.

The paper reports "FLOPs" without saying how they are counted. This is the count used
everywhere in drrl (reward, info, evaluation):

* Only the attention core is counted: the logits, the softmax and the value product. The
  Q/K/V/O projections of the layer are the same at every rank and are excluded.
* A multiply-add is 2 FLOPs. The softmax costs ``SOFTMAX_FLOPS_PER_LOGIT`` per logit (max,
  subtract, exp, sum, divide).
* Only attended (query, key) pairs are counted: with causal masking a segment of ``m`` queries
  at the end of ``n`` keys attends ``m n - m (m - 1) / 2`` pairs. Fused kernels skip masked
  blocks, so this is what a careful implementation costs; it also keeps the ratio honest.
* Low-rank attention pays ``2 r`` per pair for the logits (instead of ``2 d``) but still ``2 d``
  for the value product (values are not truncated), so its core cost is at best half of full.
* Overheads are counted separately: the spectra (Gram matrices ``2 n d^2`` per block and a
  ``d x d`` eigendecomposition, ``EIGH_FLOPS_FACTOR d^3``), the rank-``r`` projections of Q and
  K, and in ``joint`` mode the ``d x d`` core product and its SVD (``SVD_FLOPS_FACTOR d^3``).
  The ``d^3`` factors are the textbook (Golub & Van Loan) operation counts for symmetric
  eigendecomposition with vectors and for an SVD with both singular-vector sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SOFTMAX_FLOPS_PER_LOGIT = 5
EIGH_FLOPS_FACTOR = 9
SVD_FLOPS_FACTOR = 21


@dataclass(frozen=True)
class AttentionFlops:
    """FLOPs of one layer's attention, by part. ``core`` excludes overheads, ``total`` includes them."""

    logits: float
    softmax: float
    values: float
    projections: float = 0.0
    spectra: float = 0.0

    @property
    def core(self) -> float:
        return self.logits + self.softmax + self.values

    @property
    def overhead(self) -> float:
        return self.projections + self.spectra

    @property
    def total(self) -> float:
        return self.core + self.overhead


def attended_pairs(q_len: int, kv_len: int, causal: bool = True) -> int:
    """Number of (query, key) pairs attended by ``q_len`` queries at the end of ``kv_len`` keys."""
    if q_len > kv_len:
        raise ValueError(f"q_len ({q_len}) must not exceed kv_len ({kv_len})")
    return q_len * kv_len - (q_len * (q_len - 1)) // 2 if causal else q_len * kv_len


def per_head_ranks(rank: int | torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``(Hkv,)`` float64 ranks from a scalar (every key/value head) or one rank per head."""
    ranks = torch.as_tensor(rank, dtype=torch.float64).flatten()
    return ranks.expand(kv_heads) if ranks.numel() == 1 else ranks


def full_attention_flops(
    batch: int, q_heads: int, q_len: int, kv_len: int, head_dim: int, causal: bool = True
) -> AttentionFlops:
    """FLOPs of full scaled dot-product attention (Eq. 1) for one layer."""
    pairs = batch * q_heads * attended_pairs(q_len, kv_len, causal)
    return AttentionFlops(
        logits=2.0 * pairs * head_dim,
        softmax=float(SOFTMAX_FLOPS_PER_LOGIT * pairs),
        values=2.0 * pairs * head_dim,
    )


def low_rank_attention_flops(
    batch: int,
    q_heads: int,
    kv_heads: int,
    q_len: int,
    kv_len: int,
    head_dim: int,
    rank: int | torch.Tensor,
    mode: str = "separate",
    causal: bool = True,
) -> AttentionFlops:
    """FLOPs of low-rank attention for one layer, with its overheads.

    ``rank`` is a scalar or one rank per key/value head; per-head ranks are summed exactly.
    """
    ranks = per_head_ranks(rank, kv_heads)
    groups = q_heads // kv_heads
    d, m, n = float(head_dim), float(q_len), float(kv_len)
    pairs = batch * attended_pairs(q_len, kv_len, causal)
    rank_sum_q = float(ranks.sum()) * groups  # sum of ranks over query heads
    rank_sq_sum_q = float(ranks.square().sum()) * groups
    blocks_q, blocks_kv = batch * q_heads, batch * kv_heads
    spectra = (2 * m * d * d + EIGH_FLOPS_FACTOR * d**3) * blocks_q + (
        2 * n * d * d + EIGH_FLOPS_FACTOR * d**3
    ) * blocks_kv
    if mode == "separate":
        # W_q = P_q (P_q^T P_k): 4 d r^2 per query head; q' = Q W_q; k' = K P_k per kv head.
        projections = batch * (4 * d * rank_sq_sum_q + 2 * m * d * rank_sum_q + 2 * n * d * float(ranks.sum()))
    elif mode == "joint":
        # core R_q R_k^T and its SVD per query head; W_q, W_k (2 d^2 r each); q', k' per query head.
        spectra += blocks_q * (2 * d**3 + SVD_FLOPS_FACTOR * d**3)
        projections = batch * (4 * d * d * rank_sum_q + 2 * (m + n) * d * rank_sum_q)
    elif mode == "calibrated":
        # no spectra: fixed group maps; q' per query head, k' per key/value head.
        spectra = 0.0
        projections = batch * (2 * m * d * rank_sum_q + 2 * n * d * float(ranks.sum()))
    else:
        raise ValueError(f"spectral mode must be 'separate', 'joint' or 'calibrated', got {mode!r}")
    return AttentionFlops(
        logits=2.0 * pairs * rank_sum_q,
        softmax=float(SOFTMAX_FLOPS_PER_LOGIT * pairs * q_heads),
        values=2.0 * pairs * q_heads * d,
        projections=projections,
        spectra=spectra,
    )


@dataclass(frozen=True)
class GenerationFlops:
    """FLOPs of one layer's attention in generation: the prefill once, then every decode step together."""

    prefill: AttentionFlops
    decode: AttentionFlops


def key_cache_generation_flops(
    batch: int,
    q_heads: int,
    kv_heads: int,
    prompt_len: int,
    decode_steps: int,
    head_dim: int,
    rank: int | torch.Tensor,
    basis: str = "joint",
    sink_tokens: int = 0,
    recent_tokens: int = 0,
    exact_prefill: bool = False,
) -> GenerationFlops:
    """FLOPs of one layer's attention generating with a low-rank key cache (``drrl_env.generation.decode``).

    ``rank`` is a scalar or one rank per key/value head; all ranks ``d`` is full attention, with no
    overhead. Generating ``T`` tokens runs the prefill and ``T - 1`` decode steps; decode step
    ``t`` attends ``prompt_len + t`` keys. Counted, per sequence:

    * prefill spectra (``separate`` and ``joint``, not ``calibrated``): the keys' Gram
      ``2 n d^2`` and its eigendecomposition per key/value head; in ``joint`` also the group's
      query Gram ``2 n d^2`` per query head, its eigendecomposition, the core ``2 d^3``, its SVD,
      the maps ``4 d^2 R`` and their QR ``4 d R^2`` per key/value head;
    * prefill projections: ``2 n d r`` per query head and per key/value head; with
      ``exact_prefill``, the prompt's attention at full width and only the keys projected;
    * per decode step: the projection of one query (``2 d r`` per query head) and one key
      (``2 d r`` per key/value head), then width-``r`` logits, the softmax and full-width values
      over the context, plus full-width logits against the ``sink_tokens`` and
      ``recent_tokens`` exact keys (their width-``r`` scores are computed and overwritten, so
      counted too).
    """
    ranks = per_head_ranks(rank, kv_heads)
    d, n, steps = float(head_dim), float(prompt_len), float(decode_steps)
    contexts = steps * n + steps * (steps + 1) / 2  # sum over decode steps of the keys attended
    full = bool((ranks == head_dim).all())
    groups = q_heads // kv_heads
    rank_sum_q, rank_sum_kv = float(ranks.sum()) * groups, float(ranks.sum())
    logit_width = q_heads * d if full else rank_sum_q  # sum over query heads of the logit width
    prefill_width = q_heads * d if exact_prefill else logit_width
    exact_pairs = (
        0.0
        if full
        else float(sum(min(sink_tokens + recent_tokens, prompt_len + t) for t in range(1, decode_steps + 1)))
    )
    prefill_pairs = batch * attended_pairs(prompt_len, prompt_len)
    spectra = projections = 0.0
    if not full:
        if basis in ("separate", "joint"):
            spectra = kv_heads * (2 * n * d * d + EIGH_FLOPS_FACTOR * d**3)
        if basis == "joint":
            width = float(ranks.max())
            per_group = EIGH_FLOPS_FACTOR * d**3 + (2 + SVD_FLOPS_FACTOR) * d**3 + 4 * d * d * width
            spectra += q_heads * 2 * n * d * d + kv_heads * (per_group + 4 * d * width**2)
        elif basis not in ("separate", "calibrated"):
            raise ValueError(f"basis must be 'separate', 'joint' or 'calibrated', got {basis!r}")
        projections = 2 * n * d * ((0.0 if exact_prefill else rank_sum_q) + rank_sum_kv)
    prefill = AttentionFlops(
        logits=2.0 * prefill_pairs * prefill_width,
        softmax=float(SOFTMAX_FLOPS_PER_LOGIT * prefill_pairs * q_heads),
        values=2.0 * prefill_pairs * q_heads * d,
        projections=batch * projections,
        spectra=batch * spectra,
    )
    decode = AttentionFlops(
        logits=2.0 * batch * (contexts * logit_width + exact_pairs * q_heads * d),
        softmax=float(SOFTMAX_FLOPS_PER_LOGIT * batch * contexts * q_heads),
        values=2.0 * batch * contexts * q_heads * d,
        projections=0.0 if full else batch * steps * 2 * d * (rank_sum_q + rank_sum_kv),
    )
    return GenerationFlops(prefill=prefill, decode=decode)


def sensitivity_profile_flops(parameters: int, tokens: int, samples: int) -> float:
    """FLOPs of the input's Fisher sensitivity profile (``profiles.sensitivity.fisher_kl_profile``): an estimate.

    A forward costs 2 FLOPs per weight and token, a backward 4 (the usual count); the profile is one
    forward that keeps the graph and one backward per label sample: ``2 P T (1 + 2 samples)`` for
    ``P`` weights and ``T`` tokens. The candidates' low-rank outputs and attention's own share are
    left out (small against the weights' at short sequences). 0 without samples.
    """
    return 2.0 * parameters * tokens * (1 + 2 * samples) if samples else 0.0


def scaled_delta_profile_flops(parameters: int, tokens: int, candidate_attention: float) -> float:
    """FLOPs of the input's scaled output-delta profile (``profiles.delta_scale.scaled_delta_profile``): an estimate.

    One forward pass, ``2 P T``, plus ``candidate_attention``: the low-rank attention of every candidate below
    full in every layer (:func:`candidate_attention_flops`), which the Fisher count leaves out but which is most
    of what this estimate adds to the forward pass. The scale's one-off fit on validation text is not counted.
    """
    return 2.0 * parameters * tokens + candidate_attention


def candidate_attention_flops(
    num_layers: int,
    batch: int,
    q_heads: int,
    kv_heads: int,
    seq_len: int,
    head_dim: int,
    ranks: tuple[int, ...],
    mode: str,
) -> float:
    """FLOPs of every layer's low-rank attention at every candidate below ``head_dim``, over whole sequences.

    One set of spectra serves every candidate of a layer (``AttentionCall.low_rank`` of a rank table): it is
    counted once per layer; the projections and the core once per candidate.
    """
    below = [
        low_rank_attention_flops(batch, q_heads, kv_heads, seq_len, seq_len, head_dim, rank, mode)
        for rank in ranks
        if rank < head_dim
    ]
    if not below:
        return 0.0
    return num_layers * (below[0].spectra + sum(flops.core + flops.projections for flops in below))
