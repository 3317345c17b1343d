"""Attention through a low-rank key basis, exact at sinks and recent keys: the handler of ``generation.decode``.

For each layer below rank ``d``, :class:`KeyBasisAttention` computes the logits of a query ``q``
against a key ``k`` as ``(q W_q) . (k W_k)`` (:class:`~drrl_env.attention.kv_basis.KeyBasis`), except for
two sets of keys whose logits stay exact, ``q . k``:

* the first ``sink_tokens`` tokens of each sequence (its *attention sinks*, the first non-padding
  positions), stored at full width beside the compressed keys: the first token's key is an outlier
  that a low-rank basis of the keys does not represent (what one exact sink buys: docs/benchmarks.md).
  Sink keys are left out of the Gram of the keys the basis is fitted to.
* in generation, the keys of the last ``recent_tokens`` positions up to each query (a *recent
  window*, as KIVI keeps its most recent tokens unquantised): the cache keeps them at full width
  too (:class:`~drrl_env.generation.kv_cache.LowRankKeyLayer`). A decode token attends most to its
  neighbours, whose keys (at RoPE phases the prompt's basis never saw) the basis represents worst
  (what the window buys: docs/benchmarks.md, the decode runs).

By default (``exact_prefill``) the prompt itself is attended exactly: the prefill computes the
full attention, then the basis, and compresses the keys for the decode steps, as the decode-regime
peers (Loki, Palu) do; otherwise the prompt's own attention already uses the width-``R`` logits.

Execution paths (same result): several queries without a recent window (a low-rank prefill)
run fused SDPA on width ``R + d`` vectors ``[q W_q, q]`` against ``[k W_k, 0]`` (and ``[0, k]`` for
sink keys), with the values zero-padded to that width (PyTorch's fused kernels need one width;
with a narrower ``v`` SDPA falls back to its slower unfused path);
otherwise (a decode step, or a teacher-forced continuation) the width-``R`` scores against the
cache get the exact sink and recent-window scores written into them and the softmax runs
unfused, so a decode step reads ``R`` numbers per cached key and ``d`` per sink or recent key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from drrl_env.attention.hook import AttentionCall
from drrl_env.attention.kv_basis import PER_PROMPT_KINDS, KeyBasis, basis_from_grams, check_basis_kind, group_grams
from drrl_env.attention.lowrank import attend, causal_mask

SINK_TOKENS = 1
RECENT_TOKENS = 64


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


def prompt_grams(
    query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, sinks: Sinks | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The group Grams a per-prompt key basis is built from: every valid query, the valid keys but the sinks.

    The sinks' logits stay exact (:func:`attention_with_sinks`), so their keys are left out of the basis.
    """
    key_valid = valid if sinks is None else valid.scatter(1, sinks.index, False)
    return group_grams(query, key, valid, key_valid)


def attention_with_sinks(
    query: torch.Tensor,
    query_low: torch.Tensor,
    key_low: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None,
    sinks: Sinks | None,
    recent: torch.Tensor | None = None,
    window: int = 0,
    recent_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(scores * scale) v``, ``(B, Hq, m, d)``: width-``R`` scores ``q' . k'``, exact ones at the sinks.

    ``query`` ``(B, Hq, m, d)``, ``query_low`` ``(B, Hq, m, R)``, ``key_low`` ``(B, Hkv, n, R)``,
    ``value`` ``(B, Hkv, n, d)``; ``mask`` as in :func:`drrl_env.attention.lowrank.attend`. The ``m``
    queries are the last ``m`` positions of the ``n`` keys. ``recent`` ``(B, Hkv, w, d)``, when
    given, holds the full-width keys of the last ``w`` positions: the query at position ``p``
    scores the keys at positions ``p - window < j <= p`` among them exactly. ``recent_positions`` ``(w,)``, when
    given, are the positions of ``recent``'s rows instead (a ring buffer, every one in the window of the single query:
    ``m`` is 1; :class:`~drrl_env.generation.static_cache.StaticLowRankKeyLayer`).
    """
    B, Hq, m, d = query.shape
    kv_heads, n, width = key_low.shape[1], key_low.shape[-2], key_low.shape[-1]
    if m > 1 and (recent is None or window == 0):  # fused: [q', q] . [k', 0] and [0, k] at the sinks
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
    stacked = query.reshape(B, kv_heads, groups * m, d)  # the G heads of a group, each with its m queries
    scores = query_low.reshape(B, kv_heads, groups * m, width) @ key_low.transpose(-1, -2)  # (B, Hkv, G m, n)
    if sinks is not None:
        exact = stacked @ sinks.keys.transpose(-1, -2)  # (B, Hkv, G m, s)
        scores.scatter_(-1, sinks.index.view(B, 1, 1, -1).expand(-1, kv_heads, groups * m, -1), exact)
    if recent is not None and window > 0:
        span = recent.shape[-2]
        exact = stacked @ recent.transpose(-1, -2)  # (B, Hkv, G m, w)
        if recent_positions is not None:
            if m != 1:
                raise ValueError(f"recent keys at given positions serve one query at a time, got {m}")
            scores.scatter_(-1, recent_positions.view(1, 1, 1, span).expand(B, kv_heads, groups, span), exact)
        elif m == 1 and span <= window:  # a decode step: its whole recent window is exact
            scores[..., n - span :] = exact
        else:
            query_position = torch.arange(n - m, n, device=query.device).view(m, 1)
            band = torch.arange(n - span, n, device=query.device).view(1, span) > query_position - window  # (m, w)
            scores[..., n - span :] = torch.where(band.repeat(groups, 1), exact, scores[..., n - span :])
    scores = scores.mul_(scale)
    if mask is None and m > 1:
        mask = causal_mask(m, n, query.device)
    if mask is not None:
        scores.view(B, kv_heads, groups, m, n).masked_fill_(~mask.view(-1, 1, 1, m, n), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs @ value).view(B, Hq, m, d)  # (B, Hkv, G m, d): one read of each group's values


class KeyBasisAttention:
    """Attention handler that runs each layer through a key basis at the layer's ranks (module docstring).

    Args:
        ranks: ``(L, Hkv)`` from :func:`drrl_env.generation.decode.rank_table`.
        kind: ``separate``, ``joint`` or ``calibrated`` (``drrl_env.attention.kv_basis``).
        calibrated: per layer, the ``calibrated`` bases (None for the per-prompt kinds).
        cache: the generation's :class:`~drrl_env.generation.kv_cache.LowRankKeyCache`, or None for a plain
            forward pass (each call then computes, or takes, its basis for that call only).
        sink_tokens: first tokens of each sequence whose logits stay exact.
        recent_tokens: with a cache, the width of the recent window of exact keys for the queries
            after the prefill (0: none).
        exact_prefill: with a cache, attend the prompt exactly and use the basis from the first
            decode step on (False: the prompt's own attention is low-rank too).
    """

    def __init__(
        self,
        ranks: torch.Tensor,
        kind: str,
        calibrated: Sequence[KeyBasis | None] | None = None,
        cache: object | None = None,
        sink_tokens: int = SINK_TOKENS,
        recent_tokens: int = RECENT_TOKENS,
        exact_prefill: bool = True,
    ) -> None:
        check_basis_kind(kind)
        if kind not in PER_PROMPT_KINDS and calibrated is None:
            raise ValueError(f"basis {kind!r} needs its calibrated bases")
        if sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {sink_tokens}")
        if recent_tokens < 0:
            raise ValueError(f"recent_tokens must be >= 0, got {recent_tokens}")
        self.ranks, self.kind, self.calibrated, self.cache = ranks, kind, calibrated, cache
        self.sink_tokens, self.recent_tokens, self.exact_prefill = sink_tokens, recent_tokens, exact_prefill

    def _prefill(self, call: AttentionCall) -> tuple[KeyBasis, Sinks | None]:
        """The layer's basis and sinks, from the call's (prefill) queries and full-width keys."""
        valid = key_validity(call)
        sinks = find_sinks(call.key, valid, self.sink_tokens)
        if self.calibrated is not None:
            return self.calibrated[call.layer], sinks
        if call.query.shape[-2] != call.key.shape[-2]:
            raise ValueError("a per-prompt key basis is computed at the prefill, where queries and keys align")
        gram_q, gram_k = prompt_grams(call.query, call.key, valid, sinks)
        basis = basis_from_grams(gram_q, gram_k, self.ranks[call.layer], self.kind)
        return basis.to(call.query.dtype, call.query.device), sinks

    def __call__(self, call: AttentionCall) -> torch.Tensor:
        layer = None if self.cache is None else self.cache.layers[call.layer]
        if layer is not None and layer.ready and hasattr(layer, "attend"):  # a static layer attends over its storage
            return layer.attend(call.query, call.key, call.value, call.mask, call.scale)
        if bool((self.ranks[call.layer] == call.query.shape[-1]).all()):
            return call.full()
        if layer is not None and layer.ready:  # the cache stored the keys projected
            return attention_with_sinks(
                call.query, layer.basis.project_queries(call.query), call.key, call.value, call.scale, call.mask,
                layer.sinks, layer.recent, self.recent_tokens,
            )  # fmt: skip
        basis, sinks = self._prefill(call)
        if layer is None:
            keys = basis.project_keys(call.key)
        else:
            keys = layer.compress(basis, sinks, self.recent_tokens)
            basis = layer.basis  # as the cache keeps it (a static cache pads it to its width)
            if self.exact_prefill:
                return attend(call.query, call.key, call.value, call.scale, call.mask, causal_kernel=True)
        return attention_with_sinks(
            call.query, basis.project_queries(call.query), keys, call.value, call.scale, call.mask, sinks
        )
