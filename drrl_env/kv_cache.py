"""A transformers ``Cache`` whose key tensors are stored at the low rank of a :class:`~drrl_env.kv_basis.KeyBasis`.

Each layer is a :class:`LowRankKeyLayer` (a ``DynamicLayer``: it grows by concatenation like
transformers' default cache). Until the layer has a basis, keys are stored at full width; the
attention function (``drrl_env.generate``) computes the basis from the prefill's queries and
keys and calls :meth:`LowRankKeyLayer.set_basis`, which replaces the stored keys by ``K W_k``.
From then on every new key is stored as ``k W_k``. A layer built with a basis (``calibrated``)
stores projected keys from the first token. A layer whose ranks are all ``d`` keeps full keys
and never gets a basis. Values are always stored at full width.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from drrl_env.kv_basis import KeyBasis


class LowRankKeyLayer(DynamicLayer):
    """One layer's cache: values ``(B, Hkv, n, d)``; keys ``(B, Hkv, n, R)`` once a basis is set.

    Args:
        ranks: ``(Hkv,)`` ranks of the layer's key/value heads.
        head_dim: ``d``.
        basis: a basis known before the prefill (``calibrated``), or None to wait for one.
    """

    def __init__(self, ranks: torch.Tensor, head_dim: int, basis: KeyBasis | None = None) -> None:
        super().__init__()
        self.ranks = torch.as_tensor(ranks, dtype=torch.int64).cpu()
        self.head_dim = head_dim
        self.basis = basis

    @property
    def full_rank(self) -> bool:
        """True when every head keeps rank ``d``: full keys, full attention."""
        return bool((self.ranks == self.head_dim).all())

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new keys (projected once a basis is set) and values; return the whole cache."""
        if self.basis is not None:
            key_states = self.basis.project_keys(key_states)
        return super().update(key_states, value_states)

    def set_basis(self, basis: KeyBasis) -> torch.Tensor:
        """Set the layer's basis and compress the stored full-width keys to ``K W_k``; returns them."""
        if self.basis is not None:
            raise RuntimeError("this cache layer already has a key basis")
        self.basis = basis
        self.keys = basis.project_keys(self.keys)
        return self.keys

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.basis is not None:
            self.basis = self.basis.select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.basis is not None:
            self.basis = self.basis.select(torch.as_tensor(indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.basis is not None and self.basis.key_map.shape[0] > 1:
            index = torch.arange(self.basis.key_map.shape[0]).repeat_interleave(repeats)
            self.basis = self.basis.select(index)


class LowRankKeyCache(Cache):
    """One :class:`LowRankKeyLayer` per decoder layer.

    Args:
        ranks: ``(L, Hkv)`` ranks.
        head_dim: ``d``.
        bases: per layer, a basis known in advance (``calibrated``) or None.
    """

    def __init__(self, ranks: torch.Tensor, head_dim: int, bases: list[KeyBasis | None] | None = None) -> None:
        bases = bases if bases is not None else [None] * len(ranks)
        if len(bases) != len(ranks):
            raise ValueError(f"got {len(bases)} bases for {len(ranks)} layers of ranks")
        super().__init__(layers=[LowRankKeyLayer(r, head_dim, b) for r, b in zip(ranks, bases, strict=True)])

    def key_width(self, layer: int) -> int:
        """Width of the keys stored for ``layer`` (``R`` once compressed, else ``d``)."""
        keys = self.layers[layer].keys
        return int(keys.shape[-1])


def cache_bytes(cache: Cache) -> dict[str, int]:
    """Bytes held by a cache's key and value tensors, measured from the tensors: ``{"keys", "values", "total"}``."""
    sizes = {"keys": 0, "values": 0}
    for layer in cache.layers:
        for part in ("keys", "values"):
            tensor = getattr(layer, part, None)
            if tensor is not None:
                sizes[part] += tensor.numel() * tensor.element_size()
    sizes["total"] = sizes["keys"] + sizes["values"]
    return sizes
