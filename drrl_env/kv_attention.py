"""Attention through a low-rank key basis, with exact attention sinks: the handler of ``drrl_env.generate``.

For each layer below rank ``d``, :class:`KeyBasisAttention` computes the logits of a query ``q``
against a key ``k`` as ``(q W_q) . (k W_k)`` (:class:`~drrl_env.kv_basis.KeyBasis`), except for
the first ``sink_tokens`` tokens of each sequence (its *attention sinks*, the first non-padding
positions), whose logits stay exact, ``q . k``. Their keys are stored at full width beside the
compressed ones (``s`` keys per sequence, a negligible share of a long cache). Measured on
SmolLM2-135M (docs/benchmarks.md): with one exact sink, every layer at rank 32 in the
``separate`` basis costs a few percent PPL instead of about +75 %; the first token's key is an
outlier that a low-rank basis of the keys does not represent. Sink keys are left out of the
Gram of the keys the basis is fitted to.

Execution paths (same result): several queries (the prefill, or a teacher-forced continuation)
run fused SDPA on width ``R + d`` vectors ``[q W_q, q]`` against ``[k W_k, 0]`` (and ``[0, k]`` for
sink keys), with the values zero-padded to that width (PyTorch's fused kernels need one width;
with a narrower ``v`` SDPA falls back to its unfused path, measured 6x slower at n = 2048); one
query (a decode step) computes its width-``R`` scores against the cache, writes
the ``s`` exact sink scores into them, and attends unfused, so it reads ``R`` numbers per cached
key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from drrl_env.hook import AttentionCall
from drrl_env.kv_basis import PER_PROMPT_KINDS, KeyBasis, basis_from_grams, check_basis_kind, group_grams
from drrl_env.lowrank import causal_mask

SINK_TOKENS = 1


@dataclass(frozen=True)
class Sinks:
    """Exact keys of each sequence's first tokens: ``index`` ``(B, s)`` positions, ``keys`` ``(B, Hkv, s, d)``."""

    index: torch.Tensor
    keys: torch.Tensor

    def select(self, rows: torch.Tensor) -> Sinks:
        """Rows ``rows`` of the batch dimension."""
        rows = rows.to(self.keys.device)
        return Sinks(self.index[rows], self.keys[rows])


def key_validity(call: AttentionCall) -> torch.Tensor:
    """``(B, n)``: False for keys that no query of the call may attend (left padding)."""
    B, n = call.key.shape[0], call.key.shape[-2]
    if call.mask is None:
        return torch.ones(B, n, dtype=torch.bool, device=call.key.device)
    return call.mask.any(dim=-2).squeeze(1).expand(B, n)


def find_sinks(key: torch.Tensor, valid: torch.Tensor, count: int) -> Sinks | None:
    """The first ``count`` valid positions of each row of ``key`` ``(B, Hkv, n, d)`` and their keys (None if 0)."""
    if count == 0:
        return None
    first = valid.int().argmax(dim=-1, keepdim=True)  # (B, 1): first valid position
    index = (first + torch.arange(count, device=key.device)).clamp_max(key.shape[-2] - 1)  # (B, s)
    rows = index.view(index.shape[0], 1, count, 1).expand(-1, key.shape[1], -1, key.shape[-1])
    return Sinks(index, key.gather(2, rows))


def attention_with_sinks(
    query: torch.Tensor,
    query_low: torch.Tensor,
    key_low: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None,
    sinks: Sinks | None,
) -> torch.Tensor:
    """``softmax(scores * scale) v``, ``(B, Hq, m, d)``: width-``R`` scores ``q' . k'``, exact ones at the sinks.

    ``query`` ``(B, Hq, m, d)``, ``query_low`` ``(B, Hq, m, R)``, ``key_low`` ``(B, Hkv, n, R)``,
    ``value`` ``(B, Hkv, n, d)``; ``mask`` as in :func:`drrl_env.lowrank.attend`.
    """
    B, Hq, m, d = query.shape
    kv_heads, n, width = key_low.shape[1], key_low.shape[-2], key_low.shape[-1]
    if m > 1:  # fused: [q', q] . [k', 0] and [0, k] at the sinks
        if sinks is None:
            width_d = max(width, d)
            q_aug, k_aug = F.pad(query_low, (0, width_d - width)), F.pad(key_low, (0, width_d - width))
        else:
            q_aug = torch.cat([query_low, query], dim=-1)
            k_aug = F.pad(key_low, (0, d))
            sink_rows = F.pad(sinks.keys, (width, 0))  # (B, Hkv, s, R + d)
            index = sinks.index.view(B, 1, -1, 1).expand(-1, kv_heads, -1, width + d)
            k_aug.scatter_(2, index, sink_rows)
        aligned = m == n and mask is None  # SDPA's own causal kernel
        if mask is None and not aligned:
            mask = causal_mask(m, n, query.device)
        # PyTorch's fused kernels need one width for q, k and v: pad v with zeros and drop those columns after
        v_aug = F.pad(value, (0, q_aug.shape[-1] - d))
        output = F.scaled_dot_product_attention(
            q_aug, k_aug, v_aug, attn_mask=mask, is_causal=aligned, scale=scale, enable_gqa=kv_heads != Hq
        )
        return output[..., :d]
    groups = Hq // kv_heads
    scores = query_low.reshape(B, kv_heads, groups, width) @ key_low.transpose(-1, -2)  # (B, Hkv, G, n)
    if sinks is not None:
        exact = query.reshape(B, kv_heads, groups, d) @ sinks.keys.transpose(-1, -2)  # (B, Hkv, G, s)
        scores.scatter_(-1, sinks.index.view(B, 1, 1, -1).expand(-1, kv_heads, groups, -1), exact)
    scores = scores.mul_(scale)
    if mask is not None:
        scores.masked_fill_(~mask.view(mask.shape[0], 1, 1, n), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs @ value).view(B, Hq, 1, d)


class KeyBasisAttention:
    """Attention handler that runs each layer through a key basis at the layer's ranks (module docstring).

    Args:
        ranks: ``(L, Hkv)`` from :func:`drrl_env.generate.rank_table`.
        kind: ``separate``, ``joint`` or ``calibrated`` (``drrl_env.kv_basis``).
        calibrated: per layer, the ``calibrated`` bases (None for the per-prompt kinds).
        cache: the generation's :class:`~drrl_env.kv_cache.LowRankKeyCache`, or None for a plain
            forward pass (each call then computes, or takes, its basis for that call only).
        sink_tokens: first tokens of each sequence whose logits stay exact.
    """

    def __init__(
        self,
        ranks: torch.Tensor,
        kind: str,
        calibrated: Sequence[KeyBasis | None] | None = None,
        cache: object | None = None,
        sink_tokens: int = SINK_TOKENS,
    ) -> None:
        check_basis_kind(kind)
        if kind not in PER_PROMPT_KINDS and calibrated is None:
            raise ValueError(f"basis {kind!r} needs its calibrated bases")
        if sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {sink_tokens}")
        self.ranks, self.kind, self.calibrated, self.cache = ranks, kind, calibrated, cache
        self.sink_tokens = sink_tokens

    def _prefill(self, call: AttentionCall) -> tuple[KeyBasis, Sinks | None]:
        """The layer's basis and sinks, from the call's (prefill) queries and full-width keys."""
        valid = key_validity(call)
        sinks = find_sinks(call.key, valid, self.sink_tokens)
        if self.calibrated is not None:
            return self.calibrated[call.layer], sinks
        if call.query.shape[-2] != call.key.shape[-2]:
            raise ValueError("a per-prompt key basis is computed at the prefill, where queries and keys align")
        key_valid = valid if sinks is None else valid.scatter(1, sinks.index, False)
        gram_q, gram_k = group_grams(call.query, call.key, valid, key_valid)
        basis = basis_from_grams(gram_q, gram_k, self.ranks[call.layer], self.kind)
        return basis.to(call.query.dtype, call.query.device), sinks

    def __call__(self, call: AttentionCall) -> torch.Tensor:
        if bool((self.ranks[call.layer] == call.query.shape[-1]).all()):
            return call.full()
        layer = None if self.cache is None else self.cache.layers[call.layer]
        if layer is not None and layer.ready:
            basis, sinks, keys = layer.basis, layer.sinks, call.key  # the cache stored the keys projected
        else:
            basis, sinks = self._prefill(call)
            keys = basis.project_keys(call.key) if layer is None else layer.compress(basis, sinks)
        return attention_with_sinks(
            call.query, basis.project_queries(call.query), keys, call.value, call.scale, call.mask, sinks
        )
