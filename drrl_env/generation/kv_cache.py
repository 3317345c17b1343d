"""A transformers ``Cache`` whose keys are stored at the low rank of a :class:`~drrl_env.attention.kv_basis.KeyBasis`.

Each layer is a :class:`LowRankKeyLayer` (a ``DynamicLayer``: it grows by concatenation like
transformers' default cache). Until the layer is compressed, keys are stored at full width; the
attention handler (:class:`drrl_env.generation.kv_attention.KeyBasisAttention`) takes the basis (computed
from the prefill's queries and keys, or calibrated) and the sequences' attention-sink keys at
the prefill and calls :meth:`LowRankKeyLayer.compress`, which replaces the stored keys by
``K W_k`` and keeps the sink keys at full width. From then on every new key is stored as
``k W_k``, and the full-width keys of the last positions are kept beside them (``recent``: the
window the handler scores exactly; after a call of ``m`` new tokens, the last ``W + m - 1``, which
the call's earliest query needs, so ``W`` after a decode step). A layer whose ranks are all ``d``
keeps full keys and is never compressed. Values are always stored at full width.

Given ``max_tokens`` (what :func:`drrl_env.generation.decode.generate` passes: the prompt plus the tokens to
generate), each layer keeps its keys and values in storage of that many positions, made at the first write, and a
decode step writes its key and value in place: ``keys`` and ``values`` are views of the first positions. Without
it a layer grows by concatenation like transformers' ``DynamicLayer``, which copies the whole cache every token
(at batch 8 and 4096 tokens, 1.5 GB a token for SmolLM2-135M's full cache). The bytes :func:`cache_bytes` counts
are the views': the tokens held.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from drrl_env.attention.kv_basis import KeyBasis
from drrl_env.generation.kv_attention import Sinks
from drrl_env.lm.models import LoadedModel


class LowRankKeyLayer(DynamicLayer):
    """One layer's cache: values ``(B, Hkv, n, d)``; keys ``(B, Hkv, n, R)`` once a basis is set.

    The layer's ranks live in its basis; a layer that is never compressed keeps full keys.
    ``recent`` ``(B, Hkv, w, d)`` are the full-width keys of the last ``w`` positions (None
    without a recent window).
    """

    def __init__(self, max_tokens: int | None = None) -> None:
        super().__init__()
        self.max_tokens = max_tokens
        self._storage: dict[str, torch.Tensor] = {}
        self.basis: KeyBasis | None = None
        self.sinks: Sinks | None = None
        self.recent: torch.Tensor | None = None
        self.recent_tokens = 0

    @property
    def ready(self) -> bool:
        """True once :meth:`compress` has run: keys are stored projected."""
        return self.basis is not None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new keys (projected once compressed, the recent window kept) and values; return the cache."""
        if self.basis is not None:
            if self.recent is not None:
                keep = self.recent_tokens + key_states.shape[-2] - 1
                self.recent = torch.cat([self.recent, key_states], dim=-2)[..., -keep:, :]
            key_states = self.basis.project_keys(key_states)
        if self.max_tokens is None:
            return super().update(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = self._appended("keys", self.keys, key_states)
        self.values = self._appended("values", self.values, value_states)
        return self.keys, self.values

    def reset(self) -> None:
        self._storage = {}
        super().reset()

    def _appended(self, name: str, stored: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """``stored`` then ``new`` along the sequence: written into the storage behind ``stored`` where it has room.

        ``stored`` is a view of the first positions of the storage, or (the first write, after a compression, a
        crop by copy or a batch reordering) a tensor of its own, which is then copied into new storage once.
        """
        storage = self._storage.get(name)
        held = stored.shape[-2] if stored.dim() == new.dim() else 0
        needed = held + new.shape[-2]
        in_storage = (
            storage is not None
            and held > 0
            and stored.data_ptr() == storage.data_ptr()
            and stored.shape[:-2] == storage.shape[:-2]
            and stored.shape[-1] == storage.shape[-1]
            and stored.stride() == storage.stride()
        )
        if not in_storage or needed > storage.shape[-2]:
            # past max_tokens (a longer generation than announced): exact, then doubling
            room = self.max_tokens if needed <= self.max_tokens else needed if storage is None else 2 * needed
            storage = new.new_empty((*new.shape[:-2], room, new.shape[-1]))
            if held:
                storage[..., :held, :] = stored
            self._storage[name] = storage
        storage[..., held:needed, :] = new
        return storage[..., :needed, :]

    def compress(self, basis: KeyBasis, sinks: Sinks | None, recent_tokens: int = 0) -> torch.Tensor:
        """Keep ``basis``, the sink keys and the last ``recent_tokens`` keys; store ``K W_k`` and return it."""
        if self.basis is not None:
            raise RuntimeError("this cache layer is already compressed")
        self.basis, self.sinks, self.recent_tokens = basis, sinks, recent_tokens
        if recent_tokens > 0:
            self.recent = self.keys[..., -recent_tokens:, :].clone()
        self.keys = basis.project_keys(self.keys)
        return self.keys

    def _select_rows(self, rows: torch.Tensor) -> None:
        if self.basis is not None:
            self.basis = self.basis.select(rows)
        if self.sinks is not None:
            self.sinks = self.sinks.select(rows)
        if self.recent is not None:
            self.recent = self.recent[rows.to(self.recent.device)]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._select_rows(torch.as_tensor(indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.keys is not None:
            rows = torch.arange(self.keys.shape[0] // repeats).repeat_interleave(repeats)
            self._select_rows(rows)


class LowRankKeyCache(Cache):
    """One :class:`LowRankKeyLayer` per decoder layer; ``max_tokens``: each layer's storage (module docstring)."""

    def __init__(self, num_layers: int, max_tokens: int | None = None) -> None:
        check_max_tokens(max_tokens, optional=True)
        super().__init__(layers=[LowRankKeyLayer(max_tokens) for _ in range(num_layers)])


def check_max_tokens(max_tokens: object, optional: bool = False) -> None:
    """Raise ``ValueError`` unless ``max_tokens`` is a positive int (or, ``optional``, None): a cache's storage."""
    if optional and max_tokens is None:
        return
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int{' or None' if optional else ''}, got {max_tokens!r}")


def cache_bytes(cache: Cache) -> dict[str, int]:
    """Bytes held by a cache's key and value tensors, measured from the tensors: ``{"keys", "values", "total"}``.

    Keys include the full-width attention-sink and recent keys of a :class:`LowRankKeyLayer`.
    """
    sizes = {"keys": 0, "values": 0}
    for layer in cache.layers:
        for part, size in layer_bytes(layer).items():
            sizes[part] += size
    sizes["total"] = sizes["keys"] + sizes["values"]
    return sizes


def layer_bytes(layer: object) -> dict[str, int]:
    """``{"keys", "values"}`` bytes of one cache layer (:func:`cache_bytes`)."""
    sinks, recent = getattr(layer, "sinks", None), getattr(layer, "recent", None)
    parts = (("keys", layer.keys), ("values", layer.values), ("keys", getattr(sinks, "keys", None)), ("keys", recent))
    sizes = {"keys": 0, "values": 0}
    for part, tensor in parts:
        if tensor is not None:
            sizes[part] += tensor.numel() * tensor.element_size()
    return sizes


def full_cache_bytes(loaded: LoadedModel, batch: int, tokens: int) -> int:
    """Bytes of a full-width float key/value cache of ``tokens`` tokens (what transformers' DynamicCache holds)."""
    shape = loaded.attention_shape
    element = torch.finfo(loaded.model.dtype).bits // 8
    return 2 * shape.num_layers * batch * shape.kv_heads * tokens * shape.head_dim * element
