"""Full and low-rank multi-head attention (Eqs. 1-2), in two spectral modes.

Shapes follow HF's attention interface: ``q`` is ``(B, Hq, m, d)``, ``k`` and ``v`` are
``(B, Hkv, n, d)`` with ``Hq = G * Hkv`` (GQA; ``G = 1`` is plain multi-head attention). Query
row ``i`` sits at absolute position ``n - m + i`` (a segment of the last ``m`` queries against
all ``n`` keys so far; ``m = n`` for a whole sequence), so causal masking is aligned bottom-right.

Ranks are one integer per key/value head, ``(Hkv,)`` (a scalar is broadcast). A query head uses
the rank of its key/value group.

Spectral modes:

``separate`` (the paper's reading of Eq. 2): ``Q`` and ``K`` of each head are each truncated to
rank ``r``: ``Q_r = Q P_q P_q^T`` and ``K_r = K P_k P_k^T`` with ``P`` the top-``r`` right singular
vectors. Then ``Q_r K_r^T = (Q P_q M)(K P_k)^T`` with ``M = P_q^T P_k`` (``r x r``), so the
scores are computed at width ``r``: ``q' = Q (P_q M)``, ``k' = K P_k``.

``joint``: the optimal rank-``r`` approximation (Eckart-Young) of the logit matrix ``Q K^T``
itself, without forming it. With square-root factors ``R_q^T R_q = Q^T Q`` and
``R_k^T R_k = K^T K`` (``Q = U_q R_q``, ``K = U_k R_k``), the core ``C = R_q R_k^T = A S B^T`` has
the non-zero singular values of ``Q K^T``, and ``(Q K^T)_r = U_q A_r S_r B_r^T U_k^T``. Using
``U_q A_r S_r = Q R_k^T B_r`` and ``U_k B_r S_r = K R_q^T A_r`` (no inverse of ``R``):
``q' = Q R_k^T B_r S_r^{-1/2}`` and ``k' = K R_q^T A_r S_r^{-1/2}``. Everything after the two
Gram matrices is ``d x d`` work.

In both modes the scores use the model's own scale (``1/sqrt(d)``), the values keep width ``d``,
and ``r = d`` reproduces full attention.

A third mode, ``calibrated``, has no per-input spectra: each layer's key/value groups use the
``joint`` basis of Grams summed over calibration text (:mod:`drrl_env.profiles.calibration`, the low-rank
key cache's basis, shared by the query heads of a group). It needs the model's calibration on the
attention hook and runs in :meth:`drrl_env.attention.hook.AttentionCall.low_rank`; this module's functions
take the two per-input modes only.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from drrl_env.attention.spectra import BlockSpectrum, block_spectrum, symmetric_eigh

SpectralMode = Literal["separate", "joint", "calibrated"]
PER_INPUT_MODES: tuple[str, ...] = ("separate", "joint")
SPECTRAL_MODES: tuple[str, ...] = (*PER_INPUT_MODES, "calibrated")
# Core singular values below this fraction of the largest are treated as zero in ``joint``: they
# come from the eigenvalues of C^T C (float64), whose absolute error is about 1e-16 * s_1^2.
JOINT_RELATIVE_CUTOFF = 1e-7


def check_mode(mode: str) -> None:
    """Raise a ``ValueError`` unless ``mode`` is a per-input spectral mode (``calibrated`` runs in the hook)."""
    if mode not in PER_INPUT_MODES:
        raise ValueError(f"spectral mode must be one of {PER_INPUT_MODES} here, got {mode!r}")


def as_rank_vector(rank: int | torch.Tensor | list[int], kv_heads: int, head_dim: int) -> torch.Tensor:
    """Normalise a rank to ``(Hkv,)`` int64 on the CPU, or a table of candidates to ``(K, Hkv)``; check ``1 <= r <= d``.

    A scalar applies to every key/value head. A 2-D ``(K, Hkv)`` (or ``(K, 1)``) table gives ``K``
    candidate rank assignments, evaluated side by side by :func:`low_rank_attention`.
    """
    ranks = torch.as_tensor(rank, dtype=torch.int64).cpu()
    if ranks.dim() > 2:
        raise ValueError(f"rank must be a scalar, (Hkv,) or a (K, Hkv) table, got shape {tuple(ranks.shape)}")
    table = ranks if ranks.dim() == 2 else ranks.flatten().unsqueeze(0)  # (K, Hkv or 1)
    if table.shape[-1] == 1:
        table = table.expand(-1, kv_heads).clone()
    if table.shape[-1] != kv_heads or table.numel() == 0:
        raise ValueError(
            f"rank must be a scalar or have one entry per key/value head ({kv_heads}), got shape {tuple(ranks.shape)}"
        )
    if int(table.min()) < 1 or int(table.max()) > head_dim:
        raise ValueError(f"ranks must lie in [1, head_dim={head_dim}], got {ranks.tolist()}")
    return table if ranks.dim() == 2 else table[0]


def expand_kv_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Repeat key/value heads for their query heads, HF ``repeat_kv`` order: ``(B, Hkv, ...) -> (B, Hkv*G, ...)``."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def causal_mask(q_len: int, kv_len: int, device: torch.device | str) -> torch.Tensor:
    """Boolean ``(q_len, kv_len)`` mask, True where query ``i`` (position ``kv_len - q_len + i``) may see key ``j``."""
    query_pos = torch.arange(kv_len - q_len, kv_len, device=device).unsqueeze(1)
    return torch.arange(kv_len, device=device).unsqueeze(0) <= query_pos


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    fused: bool = True,
    causal_kernel: bool = False,
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` for ``q (B,Hq,m,e)``, ``k (B,Hk,n,e)``, ``v (B,Hv,n,d)`` (Eq. 1).

    ``Hk`` and ``Hv`` each divide ``Hq`` (GQA). ``mask`` is boolean, broadcastable to ``(B, 1, m, n)``,
    True where attention is allowed; ``None`` means causal, aligned bottom-right.

    PyTorch's fused SDPA kernels need ``e == d`` and one head count for ``k`` and ``v``; with
    other widths SDPA falls back to a slow unfused path. ``fused=True`` (the default, fastest in
    ``benchmarks/attention.py`` on CPU) zero-pads ``q`` and ``k`` to width ``d`` and runs fused
    SDPA: the result is identical, the wall-clock is that of full attention, and the FLOPs model
    still counts width ``e``. ``fused=False`` is the readable reference path that really
    multiplies at width ``e`` (grouping the query heads of one key head, so a shared ``k`` is not
    copied). ``causal_kernel`` (fused, no mask, ``m = n``) runs SDPA's own causal kernel, which
    skips the masked blocks instead of an explicit mask (faster; the env keeps the explicit mask, so its
    recorded results reproduce bit for bit).
    """
    B, Hq, m, e = q.shape
    n, d = k.shape[-2], v.shape[-1]
    if fused or (e == d and k.shape[1] == v.shape[1]):
        if e < d:
            q, k = F.pad(q, (0, d - e)), F.pad(k, (0, d - e))
        if k.shape[1] != v.shape[1]:
            v = expand_kv_heads(v, k.shape[1] // v.shape[1])
        causal = causal_kernel and mask is None and m == n > 1
        if mask is None and not causal and n > 1:
            mask = causal_mask(m, n, q.device)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=k.shape[1] != Hq
        )
    if mask is None:
        mask = causal_mask(m, n, q.device) if m > 1 or n > 1 else None
    Hk, Hv = k.shape[1], v.shape[1]
    groups = Hq // Hk
    qg = q.reshape(B, Hk, groups * m, e)  # (B, Hk, G*m, e): the G query heads of each key head
    scores = (qg @ k.transpose(-1, -2)).mul_(scale)  # (B, Hk, G*m, n)
    scores = scores.view(B, Hk, groups, m, n)
    if mask is not None:
        allowed = mask if mask.dim() == 2 else mask.unsqueeze(2)  # (m,n) or (B,1,1,m,n)
        scores.masked_fill_(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(B, Hq, m, n)  # (B, Hq, m, n)
    if mask is not None:
        probs = probs.nan_to_num_(0.0)  # a fully masked (padding) row attends to nothing
    out = probs.view(B, Hv, Hq // Hv * m, n) @ v  # (B, Hv, (Hq/Hv)*m, d)
    return out.view(B, Hq, m, d)


def truncate_to_rank(x: torch.Tensor, spectrum: BlockSpectrum, rank: int) -> torch.Tensor:
    """Rank-``r`` truncated SVD of each block (Eq. 2): ``X_r = sum_{i<=r} sigma_i u_i v_i^T = X V_r V_r^T``."""
    basis = spectrum.right_vectors[..., :rank].to(x.dtype)  # (..., d, r)
    return x @ basis @ basis.transpose(-1, -2)


def rank_column_mask(ranks: torch.Tensor, groups: int, width: int, device: torch.device) -> torch.Tensor:
    """0/1 mask keeping the first ``r_h`` columns of each query head ``h``: ranks ``(..., Hkv)`` -> ``(..., Hq, W)``.

    The leading dimensions (candidates) are placed so the mask broadcasts against ``(B, Hq, *, width)``:
    the result is ``(..., 1, Hq, width)`` when ``ranks`` has a leading candidate dimension.
    """
    per_query_head = ranks.repeat_interleave(groups, dim=-1).to(device)  # (..., Hq)
    mask = (torch.arange(width, device=device) < per_query_head.unsqueeze(-1)).to(torch.float64)  # (..., Hq, W)
    return mask if ranks.dim() == 1 else mask.unsqueeze(-3)  # (K, 1, Hq, W) against the batch dimension


def separate_projections(
    q_spec: BlockSpectrum, k_spec: BlockSpectrum, ranks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projections for ``separate`` mode: ``W_q = P_q (P_q^T P_k)`` ``(B,Hq,d,R)`` and ``W_k = P_k`` ``(B,Hkv,d,R)``.

    ``R = max(ranks)``; columns beyond a head's own rank are zero, so they add nothing to the scores.
    With a ``(K, Hkv)`` table of candidate ranks both get a leading ``K`` dimension.
    """
    Hq, Hkv = q_spec.singular_values.shape[1], k_spec.singular_values.shape[1]
    groups, width = Hq // Hkv, int(ranks.max())
    device = q_spec.right_vectors.device
    keep_k = rank_column_mask(ranks, 1, width, device).unsqueeze(-2)  # (..., Hkv, 1, R)
    keep_q = rank_column_mask(ranks, groups, width, device).unsqueeze(-2)  # (..., Hq, 1, R)
    p_k = k_spec.right_vectors[..., :width] * keep_k  # (..., B, Hkv, d, R)
    p_q = q_spec.right_vectors[..., :width] * keep_q  # (..., B, Hq, d, R)
    overlap = p_q.transpose(-1, -2) @ p_k.repeat_interleave(groups, dim=-3)  # M = P_q^T P_k, (..., B, Hq, R, R)
    return p_q @ overlap, p_k


LogitCore = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def joint_projections(
    q_spec: BlockSpectrum, k_spec: BlockSpectrum, ranks: torch.Tensor, core: LogitCore | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projections for ``joint`` mode: ``W_q = R_k^T B_r S_r^{-1/2}`` and ``W_k = R_q^T A_r S_r^{-1/2}``.

    Both are ``(B, Hq, d, R)``: ``k'`` depends on the query head. ``core`` is the result of
    :func:`logit_core_svd`, computed when not given. With a ``(K, Hkv)`` table of candidate ranks
    both get a leading ``K`` dimension.
    """
    Hq, Hkv = q_spec.singular_values.shape[1], k_spec.singular_values.shape[1]
    groups, width = Hq // Hkv, int(ranks.max())
    core_u, core_s, core_vh = logit_core_svd(q_spec, k_spec) if core is None else core
    r_q = q_spec.root_factor()  # (B, Hq, d, d)
    r_k = expand_kv_heads(k_spec.root_factor(), groups)  # (B, Hq, d, d)
    top = core_s[..., :width]
    kept = top > JOINT_RELATIVE_CUTOFF * core_s[..., :1]
    inv_sqrt = torch.where(kept, top.clamp_min(torch.finfo(top.dtype).tiny).rsqrt(), 0.0)
    keep = inv_sqrt * rank_column_mask(ranks, groups, width, top.device)  # (..., B, Hq, R)
    w_q = (r_k.transpose(-1, -2) @ core_vh.transpose(-1, -2)[..., :width]) * keep.unsqueeze(-2)  # (..., B,Hq,d,R)
    w_k = (r_q.transpose(-1, -2) @ core_u[..., :width]) * keep.unsqueeze(-2)
    return w_q, w_k


def logit_core(q_spec: BlockSpectrum, k_spec: BlockSpectrum) -> torch.Tensor:
    """The ``d x d`` core ``C = R_q R_k^T`` per query head, ``(B, Hq, d, d)``: ``Q K^T = U_q C U_k^T``.

    ``||C||_F = ||Q K^T||_F``, so the logits' Frobenius norm costs no SVD.
    """
    groups = q_spec.singular_values.shape[1] // k_spec.singular_values.shape[1]
    return q_spec.root_factor() @ expand_kv_heads(k_spec.root_factor(), groups).transpose(-1, -2)


def logit_core_svd(q_spec: BlockSpectrum, k_spec: BlockSpectrum) -> LogitCore:
    """SVD ``A, S, B^T`` of the core ``C`` (see :func:`logit_core`) per query head, ``(B, Hq, ...)``.

    ``S`` are exactly the non-zero singular values of the unscaled logits ``Q K^T`` (padded
    with zeros to ``d``), so the tail energies of ``Q K^T`` are tails of ``S`` (Eckart-Young).
    Computed from the float64 eigendecomposition of ``C^T C`` (``B``, ``S^2``) and ``A = C B S^{-1}``:
    on real attention blocks this is about 8x faster on CPU than ``torch.linalg.svd``, whose
    iterations slow down on their clustered spectra. Columns of ``A`` whose singular value is
    below ``JOINT_RELATIVE_CUTOFF * S_1`` are zero.
    """
    core = logit_core(q_spec, k_spec)
    eigenvalues, eigenvectors = symmetric_eigh(core.transpose(-1, -2) @ core)  # ascending
    singular_values = eigenvalues.flip(-1).clamp_min(0.0).sqrt()  # (B, Hq, d) descending
    right = eigenvectors.flip(-1)  # (B, Hq, d, d)
    kept = singular_values > JOINT_RELATIVE_CUTOFF * singular_values[..., :1]
    left = (core @ right) / torch.where(kept, singular_values, 1.0).unsqueeze(-2) * kept.unsqueeze(-2)
    return left, singular_values, right.transpose(-1, -2)


def low_rank_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    rank: int | torch.Tensor,
    mode: SpectralMode = "separate",
    q_spec: BlockSpectrum | None = None,
    k_spec: BlockSpectrum | None = None,
    core: LogitCore | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Width-``r`` queries and keys ``q' (B,Hq,m,R)``, ``k' (B,Hk,n,R)`` with ``q' k'^T`` the rank-``r`` logits.

    ``Hk = Hkv`` in ``separate`` mode and ``Hq`` in ``joint`` mode. A ``(K, Hkv)`` table of
    candidate ranks (see :func:`as_rank_vector`) gives ``(K, B, ...)`` outputs, one per candidate.
    Spectra are computed when not given (pass them, and in ``joint`` mode the
    :func:`logit_core_svd` ``core``, to reuse one decomposition across several ranks).
    """
    check_mode(mode)
    ranks = as_rank_vector(rank, k.shape[1], q.shape[-1])
    q_spec = block_spectrum(q) if q_spec is None else q_spec
    k_spec = block_spectrum(k) if k_spec is None else k_spec
    if mode == "separate":
        w_q, w_k = separate_projections(q_spec, k_spec, ranks)
        return q @ w_q.to(q.dtype), k @ w_k.to(k.dtype)
    w_q, w_k = joint_projections(q_spec, k_spec, ranks, core)
    groups = q.shape[1] // k.shape[1]
    return q @ w_q.to(q.dtype), expand_kv_heads(k, groups) @ w_k.to(k.dtype)


def low_rank_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rank: int | torch.Tensor,
    mode: SpectralMode = "separate",
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    q_spec: BlockSpectrum | None = None,
    k_spec: BlockSpectrum | None = None,
    fused: bool = True,
    core: LogitCore | None = None,
) -> torch.Tensor:
    """Low-rank attention (Eqs. 1-2): ``softmax(q' k'^T * scale) v``, ``(B, Hq, m, d)``; scores cost ``O(m n r)``.

    ``fused`` selects the execution path of :func:`attend` (same result). With a ``(K, Hkv)`` table
    of candidate ranks the output is ``(K, B, Hq, m, d)``: the ``K`` candidates run as one batched
    attention over ``K * B`` sequences, sharing the spectra (the greedy oracle's batched pass).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_low, k_low = low_rank_qk(q, k, rank, mode, q_spec, k_spec, core)
    if q_low.dim() == 4:
        return attend(q_low, k_low, v, scale, mask, fused)
    K, B = q_low.shape[:2]
    v_all = v.expand(K, *v.shape).flatten(0, 1)  # (K*B, Hkv, n, d)
    if mask is not None and mask.dim() == 4:  # (B or 1, 1, m, n) -> (K*B, 1, m, n); lower ranks broadcast as they are
        mask = mask.expand(K, B, *mask.shape[1:]).flatten(0, 1)
    out = attend(q_low.flatten(0, 1), k_low.flatten(0, 1), v_all, scale, mask, fused)  # (K*B, Hq, m, d)
    return out.view(K, B, *out.shape[1:])


def full_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Full-rank scaled dot-product attention (Eq. 1), ``(B, Hq, m, d)``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return attend(q, k, v, scale, mask)
