"""Key bases for a low-rank key cache: per layer and key/value head, a query map and a key map.

A basis of a key/value head ``h`` is a pair of ``d x R`` maps ``(W_q, W_k)`` such that the logit
of a query ``q`` of any query head of ``h``'s group against a key ``k`` is approximated by
``(q W_q) . (k W_k)``. Keys are cached as ``k W_k`` (width ``R`` instead of ``d``) and each new
query is projected once, so a decode step reads ``R`` numbers per cached key instead of ``d``.
With per-head ranks, ``R`` is the layer's largest rank and a head's columns beyond its own
rank are zero. Values are not truncated.

Kinds (``BASIS_KINDS``):

``separate``: ``W_q = W_k = P_r``, the top-``r`` right singular vectors of the prompt's keys
``K`` of head ``h``. Then ``(q P_r)(k P_r)^T = q K_r``-style logits: every key is replaced by
its projection onto the keys' own rank-``r`` subspace (Eq. 2 applied to ``K`` alone); the
queries are projected onto the same basis (the paper's ``separate`` truncation of ``Q`` needs
the queries' own basis, which a decode step's single query does not have).

``joint``: the Eckart-Young-optimal rank-``r`` approximation of the group's stacked logits
``[Q_1; ...; Q_G] K^T`` (the ``G`` query heads sharing key head ``h``). Stacking the queries
sums their Gram matrices, so this is :func:`drrl_env.attention.lowrank.joint_projections` on the spectra
of ``sum_g Q_g^T Q_g`` and ``K^T K``. With ``G = 1`` it is ``lowrank``'s ``joint`` mode; with GQA
the ``G`` query heads share one basis, so the cache holds one width-``r`` key per key/value head
(``lowrank``'s per-query-head core would need ``G`` of them, a larger cache than full width).

``calibrated``: the ``joint`` basis of Grams summed over calibration text
(:mod:`drrl_env.profiles.calibration`), the same for every prompt: no per-prompt spectra. For a model
without rotary embeddings it can be folded into the query and key projection weights; with
RoPE it acts on post-rotation vectors and is applied after the rotation, as here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from drrl_env.attention.lowrank import joint_projections, rank_column_mask
from drrl_env.attention.spectra import gram_spectrum

BasisKind = Literal["separate", "joint", "calibrated"]
BASIS_KINDS: tuple[str, ...] = ("separate", "joint", "calibrated")
PER_PROMPT_KINDS: tuple[str, ...] = ("separate", "joint")


def check_basis_kind(kind: str) -> None:
    """Raise a ``ValueError`` unless ``kind`` is one of ``BASIS_KINDS``."""
    if kind not in BASIS_KINDS:
        raise ValueError(f"basis must be one of {BASIS_KINDS}, got {kind!r}")


@dataclass(frozen=True)
class KeyBasis:
    """Query and key maps of one layer, ``(B or 1, Hkv, d, R)`` each (float64 or the model's dtype).

    ``ranks`` ``(Hkv,)`` are the ranks the maps were built for; ``R = max(ranks)``.
    """

    query_map: torch.Tensor
    key_map: torch.Tensor
    ranks: torch.Tensor

    @property
    def width(self) -> int:
        """``R``: the width of a cached key."""
        return int(self.key_map.shape[-1])

    def to(self, dtype: torch.dtype, device: torch.device | str) -> KeyBasis:
        """The same maps in ``dtype`` on ``device``."""
        return KeyBasis(self.query_map.to(device, dtype), self.key_map.to(device, dtype), self.ranks)

    def project_keys(self, key: torch.Tensor) -> torch.Tensor:
        """``k W_k``: ``(B, Hkv, n, d) -> (B, Hkv, n, R)``."""
        return key @ self.key_map.to(key.dtype)

    def project_queries(self, query: torch.Tensor) -> torch.Tensor:
        """``q W_q`` with the map of each query head's group: ``(B, Hq, m, d) -> (B, Hq, m, R)``.

        Query head ``i`` belongs to key/value head ``i // G`` (HF's ``repeat_kv`` order).
        """
        B, Hq, m, d = query.shape
        kv_heads = self.query_map.shape[-3]
        grouped = query.reshape(B, kv_heads, Hq // kv_heads * m, d)  # the G heads of a group, stacked
        return (grouped @ self.query_map.to(query.dtype)).reshape(B, Hq, m, self.width)

    def select(self, index: torch.Tensor) -> KeyBasis:
        """Rows ``index`` of the batch dimension (a shared ``(1, ...)`` basis is returned as it is)."""
        if self.key_map.shape[0] == 1:
            return self
        index = index.to(self.key_map.device)
        return KeyBasis(self.query_map[index], self.key_map[index], self.ranks)


def group_grams(
    query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor | None = None, key_valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram matrices of a key/value group's stacked queries and of its keys: ``(B, Hkv, d, d)`` each.

    ``query`` ``(B, Hq, n, d)`` and ``key`` ``(B, Hkv, n, d)`` are one prompt's; ``valid``
    ``(B, n)`` is False at padding positions, whose rows are left out (``key_valid``, when
    given, selects the key rows instead).
    """
    B, Hq, n, d = query.shape
    kv_heads = key.shape[1]
    key_valid = valid if key_valid is None else key_valid
    if valid is not None:
        query = query * valid.to(query.dtype).view(B, 1, n, 1)
    if key_valid is not None:
        key = key * key_valid.to(key.dtype).view(B, 1, n, 1)
    grouped = query.reshape(B, kv_heads, Hq // kv_heads * n, d)
    return grouped.transpose(-1, -2) @ grouped, key.transpose(-1, -2) @ key


def basis_from_grams(gram_q: torch.Tensor, gram_k: torch.Tensor, ranks: torch.Tensor, kind: str) -> KeyBasis:
    """The :class:`KeyBasis` of rank ``ranks`` ``(Hkv,)`` from group Grams ``(B, Hkv, d, d)`` (module docstring).

    ``kind`` is ``separate`` (keys' top singular vectors) or ``joint``/``calibrated`` (the
    group's logit core). Maps are float64.
    """
    check_basis_kind(kind)
    ranks = torch.as_tensor(ranks, dtype=torch.int64).cpu()
    key_spectrum = gram_spectrum(gram_k)
    if kind == "separate":
        width = int(ranks.max())
        keep = rank_column_mask(ranks, 1, width, gram_k.device).unsqueeze(-2)  # (Hkv, 1, R)
        top = key_spectrum.right_vectors[..., :width] * keep
        return KeyBasis(top, top, ranks)
    query_map, key_map = joint_projections(gram_spectrum(gram_q), key_spectrum, ranks)
    return orthonormal_keys(KeyBasis(query_map, key_map, ranks))


def orthonormal_keys(basis: KeyBasis) -> KeyBasis:
    """The same logits ``W_q W_k^T`` with an orthonormal key map: ``W_k = P T`` (QR), ``(W_q T^T, P)``.

    A cached key is then its coordinates in an orthonormal basis of the kept key subspace. A
    head's columns beyond its rank stay zero in both maps (``T`` is upper triangular and its
    columns for zero columns of ``W_k`` are zero).
    """
    orthonormal, triangular = torch.linalg.qr(basis.key_map)
    keep = rank_column_mask(basis.ranks, 1, basis.width, basis.key_map.device).unsqueeze(-2)  # (Hkv, 1, R)
    query_map = basis.query_map @ triangular.transpose(-1, -2)
    return KeyBasis(query_map * keep, orthonormal * keep, basis.ranks)


@dataclass(frozen=True)
class CalibrationGrams:
    """Summed Grams ``(L, Hkv, d, d)`` float64 of the group queries and of the keys, and where they came from."""

    query: torch.Tensor
    key: torch.Tensor
    source: dict[str, str]
    _layer_bases: dict[tuple[int, tuple[int, ...]], KeyBasis] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def layer_basis(self, layer: int, ranks: torch.Tensor) -> KeyBasis:
        """The ``calibrated`` :class:`KeyBasis` ``(1, Hkv, d, R)`` of ``layer`` at ``ranks (Hkv,)``, memoised."""
        key = (layer, tuple(int(rank) for rank in ranks))
        if key not in self._layer_bases:
            self._layer_bases[key] = basis_from_grams(
                self.query[layer : layer + 1], self.key[layer : layer + 1], torch.tensor(key[1]), "calibrated"
            )
        return self._layer_bases[key]

    def bases(self, ranks: torch.Tensor) -> list[KeyBasis]:
        """One ``calibrated`` :class:`KeyBasis` ``(1, Hkv, d, R_l)`` per layer for ranks ``(L, Hkv)``."""
        if len(ranks) != self.query.shape[0]:
            raise ValueError(f"got ranks for {len(ranks)} layers, the calibration has {self.query.shape[0]}")
        return [self.layer_basis(layer, ranks[layer]) for layer in range(len(ranks))]
