"""A low-rank key cache of fixed shapes, which ``torch.compile`` (and CUDA graphs) can capture: the decode steps' path.

:class:`~drrl_env.generation.kv_cache.LowRankKeyCache` holds exactly the tokens seen, and its recent window slides by
slicing, so every decode step has new shapes. transformers compiles ``generate``'s decode steps only for a ``Cache``
whose ``is_compileable`` is True, whose tensors keep their shapes and addresses (its ``StaticCache``). A
:class:`StaticLowRankKeyCache` is that for the low-rank keys of ``drrl_env.generation.kv_attention``: each layer
allocates, once, for ``max_tokens`` positions

* values ``(B, Hkv, max_tokens, d)``;
* keys ``(B, Hkv, max_tokens, W)`` of the layer's *width bucket* ``W``: the basis width ``R`` rounded up to a
  multiple of ``width_step`` (:func:`bucket_widths`). The basis maps get ``W - R`` zero columns, so the logits are
  exactly those at width ``R``; layers and rank tables with the same buckets share one compiled graph;
* the recent window as a ring of ``w`` full-width keys and their positions (a decode step writes slot ``p mod w``),
  so its exact logits are scattered at those positions instead of the last ``w``;
* a layer whose ranks are all ``d`` keeps full keys of shape ``(B, Hkv, max_tokens, d)``, as ``StaticLayer`` does.

Each decode step attends over all ``max_tokens`` positions; the positions not yet written are masked (as with
transformers' ``StaticCache``). The attention of such a layer is computed by :meth:`StaticLowRankKeyLayer.attend`,
reached from the attention hook through the layer :func:`bind` attaches to each attention module, without the
per-context handler lookup (a ``ContextVar``, which ``torch.compile`` cannot trace), or, in a cache not bound, from
the handler. The prefill is not compiled: it
runs the :class:`~drrl_env.generation.kv_attention.KeyBasisAttention` handler, which computes each layer's basis and
calls :meth:`StaticLowRankKeyLayer.compress`.

After the prefill a layer takes one token per call (decode steps); beam search reorders in place; cropping
(assisted decoding) is not supported.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, StaticLayer

from drrl_env.attention.hook import BOUND_LAYER
from drrl_env.attention.kv_basis import KeyBasis
from drrl_env.generation.kv_attention import Sinks, attention_with_sinks
from drrl_env.generation.kv_cache import check_max_tokens

WIDTH_STEP = 16


def bucket_widths(ranks: torch.Tensor, head_dim: int, width_step: int = WIDTH_STEP) -> list[int | None]:
    """Per layer, the stored key width: ``max(ranks)`` rounded up to a multiple of ``width_step`` (at most ``d``).

    ``ranks`` ``(L, Hkv)``; None for a layer whose ranks are all ``head_dim`` (full keys, full attention).
    """
    if width_step < 1:
        raise ValueError(f"width_step must be >= 1, got {width_step}")
    widths: list[int | None] = []
    for row in ranks:
        if bool((row == head_dim).all()):
            widths.append(None)
        else:
            widths.append(min(head_dim, math.ceil(int(row.max()) / width_step) * width_step))
    return widths


def _static(*tensors: torch.Tensor) -> None:
    """Tell ``torch.compile`` that these tensors keep their address (what lets CUDA graphs replay over them)."""
    if not torch.compiler.is_compiling():
        for tensor in tensors:
            torch._dynamo.mark_static_address(tensor)


class StaticLowRankKeyLayer(StaticLayer):
    """One layer of a :class:`StaticLowRankKeyCache`: storage for ``max_tokens`` positions (module docstring).

    Args:
        max_tokens: positions of the storage (the prompt plus the tokens to generate).
        width: the stored key width ``W`` (:func:`bucket_widths`), or None for a full-rank layer.
    """

    is_compileable = True
    is_croppable = False

    def __init__(self, max_tokens: int, width: int | None) -> None:
        super().__init__(max_tokens)
        self.width = width
        self.basis: KeyBasis | None = None
        self.sinks: Sinks | None = None
        self.recent: torch.Tensor | None = None
        self.recent_positions: torch.Tensor | None = None
        self._prompt_keys: torch.Tensor | None = None

    @property
    def ready(self) -> bool:
        """True once the layer attends by itself (:meth:`attend`): a full-rank layer always, others after compress."""
        return self.width is None or self.basis is not None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if self.width is None:
            super().lazy_initialization(key_states, value_states)
            return
        self.device = key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.values = value_states.new_zeros((*value_states.shape[:2], self.max_cache_len, value_states.shape[-1]))
        self.cumulative_length = self.cumulative_length.to(self.device)
        _static(self.values, self.cumulative_length)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys and values at their positions; return the whole storage (the prompt's keys at first)."""
        count = key_states.shape[-2]
        if self.basis is not None and count != 1:
            raise ValueError(f"a static low-rank key layer takes one token per call after the prefill, got {count}")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        positions = torch.arange(count, device=self.device) + self.cumulative_length
        self.cumulative_length.add_(count)
        self.values.index_copy_(2, positions, value_states)
        if self.width is None:
            self.keys.index_copy_(2, positions, key_states)
            return self.keys, self.values
        if self.basis is None:  # the prefill: the handler computes the basis and compresses these keys
            self._prompt_keys = key_states
            return key_states, self.values[..., :count, :]
        self.keys.index_copy_(2, positions, self.basis.project_keys(key_states))
        if self.recent is not None:
            slots = positions % self.recent.shape[-2]
            self.recent.index_copy_(2, slots, key_states)
            self.recent_positions.index_copy_(0, slots, positions)
        return self.keys, self.values

    def compress(self, basis: KeyBasis, sinks: Sinks | None, recent_tokens: int = 0) -> torch.Tensor:
        """Store the prompt's keys as ``K W_k`` at width ``W``; keep the sinks and the ring of recent keys.

        Returns the prompt's projected keys ``(B, Hkv, n, W)``.
        """
        if self.width is None or self.basis is not None or self._prompt_keys is None:
            raise RuntimeError("compress() follows the prefill's update() once, on a layer below rank d")
        if basis.width > self.width:
            raise ValueError(f"a basis of width {basis.width} does not fit this layer's width {self.width}")
        prompt, self._prompt_keys = self._prompt_keys, None
        pad = (0, self.width - basis.width)
        key_map = F.pad(basis.key_map, pad).to(prompt.dtype).contiguous()
        self.basis = KeyBasis(F.pad(basis.query_map, pad).to(prompt.dtype).contiguous(), key_map, basis.ranks)
        n = prompt.shape[-2]
        self.keys = prompt.new_zeros((*prompt.shape[:2], self.max_cache_len, self.width))
        self.keys[..., :n, :] = self.basis.project_keys(prompt)
        self.sinks = sinks
        _static(self.keys, key_map, self.basis.query_map)
        window = min(recent_tokens, self.max_cache_len)
        if window > 0:
            # slot j holds position j until a key is written there: a future position, masked until then
            self.recent = prompt.new_zeros((*prompt.shape[:2], window, prompt.shape[-1]))
            self.recent_positions = torch.arange(window, device=prompt.device)
            kept = torch.arange(max(0, n - window), n, device=prompt.device)
            self.recent.index_copy_(2, kept % window, prompt[..., kept, :])
            self.recent_positions.index_copy_(0, kept % window, kept)
            _static(self.recent, self.recent_positions)
        return self.keys[..., :n, :]

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        """``(B, Hq, m, d)``: the attention of ``query`` over this layer's storage (``key``, ``value``: update's).

        ``mask`` ``(B, 1, m, max_tokens)`` boolean (True = attend), or None (every written position, causally).
        """
        if mask is None:
            last = self.cumulative_length - query.shape[-2]  # position of the first query
            query_positions = last + torch.arange(query.shape[-2], device=query.device).view(-1, 1)
            mask = torch.arange(self.max_cache_len, device=query.device).view(1, -1) <= query_positions
            mask = mask.view(1, 1, *mask.shape)
        if self.width is None:
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, scale=scale, enable_gqa=key.shape[1] != query.shape[1]
            )
        return attention_with_sinks(
            query, self.basis.project_queries(query), key, value, scale, mask, self.sinks,
            self.recent, 0 if self.recent is None else self.recent.shape[-2], self.recent_positions,
        )  # fmt: skip

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: rows ``beam_idx`` of every stored tensor, copied in place (the storage keeps its address)."""
        for tensor in (self.keys, self.values, self.recent):
            if tensor is not None:
                tensor.copy_(tensor.index_select(0, beam_idx.to(tensor.device)))
        if self.basis is not None:
            selected = self.basis.select(beam_idx)
            if selected is not self.basis:
                self.basis.query_map.copy_(selected.query_map)
                self.basis.key_map.copy_(selected.key_map)
        if self.sinks is not None:
            selected = self.sinks.select(beam_idx)
            self.sinks.index.copy_(selected.index)
            self.sinks.keys.copy_(selected.keys)

    def reset(self) -> None:
        """Empty the layer for a new generation: positions back to 0; a low-rank layer forgets its basis and keys."""
        if self.width is not None:
            self.basis = self.sinks = self.recent = self.recent_positions = self._prompt_keys = None
            self.keys = None
            if self.is_initialized:
                self.values.zero_()
            self.cumulative_length.zero_()
            return
        super().reset()

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("the static low-rank key cache does not repeat its batch (contrastive search)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("the static low-rank key cache does not select batch rows (contrastive search)")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the static low-rank key cache cannot be cropped (assisted decoding)")


class StaticLowRankKeyCache(Cache):
    """One :class:`StaticLowRankKeyLayer` per decoder layer (module docstring); ``is_compileable`` is True.

    Args:
        widths: per layer, the stored key width, or None for a full-rank layer (:func:`bucket_widths`).
        max_tokens: positions each layer stores: the prompt plus the tokens to generate.
    """

    def __init__(self, widths: Sequence[int | None], max_tokens: int) -> None:
        check_max_tokens(max_tokens)
        super().__init__(layers=[StaticLowRankKeyLayer(max_tokens, width) for width in widths])


@contextlib.contextmanager
def bind(model: PreTrainedModel, cache: StaticLowRankKeyCache) -> Iterator[None]:
    """Attach each layer of ``cache`` to its hooked attention module for the block (``drrl_env.attention.hook``).

    The hook then calls the layer's :meth:`~StaticLowRankKeyLayer.attend` once the layer is ready, without the
    per-context handler. The binding is the model's, not the context's: one static generation per model at a time.

    Raises:
        RuntimeError: the model is not hooked, or another static cache is bound to it.
    """
    hook = getattr(model, "_drrl_hook", None)
    if hook is None:
        raise RuntimeError("bind() needs a hooked model: call drrl_env.attention.hook.install(model) first")
    modules = hook.modules
    if any(getattr(module, BOUND_LAYER, None) is not None for module in modules):
        raise RuntimeError("another static low-rank key cache is bound to this model (one generation at a time)")
    for module in modules:
        setattr(module, BOUND_LAYER, cache.layers[module.layer_idx])
    try:
        yield
    finally:
        for module in modules:
            setattr(module, BOUND_LAYER, None)
