"""Generation with a low-rank key cache, through transformers' own ``generate`` and cache machinery.

:func:`generate` runs ``model.generate`` with a :class:`~drrl_env.kv_cache.LowRankKeyCache` and
the :class:`KeyBasisAttention` handler on the model's attention hook (``drrl_env.hook``):

* prefill: for each layer whose ranks are below ``d``, the handler computes the layer's
  :class:`~drrl_env.kv_basis.KeyBasis` from the prompt's post-RoPE queries and keys (padding
  left out), once, and the cache replaces the prompt's keys by their width-``R`` coordinates.
  A ``calibrated`` basis is known before the prompt (no per-prompt spectra). The prefill's own
  attention already uses the width-``R`` logits;
* each decode step: the cache stores the new key as ``k W_k``; the handler projects the new query
  with ``W_q`` and attends at width ``R`` over the cached keys, with full-width values.

Layers at rank ``d`` keep full keys and full attention, so ``ranks="full"`` is plain generation.
Sampling, stopping criteria, batching with padding and beam search are transformers' own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from drrl_env.calibration import CalibrationGrams, calibration_grams
from drrl_env.hook import AttentionCall, install
from drrl_env.kv_basis import PER_PROMPT_KINDS, KeyBasis, basis_from_grams, check_basis_kind, group_grams
from drrl_env.kv_cache import LowRankKeyCache
from drrl_env.lowrank import as_rank_vector, attend
from drrl_env.models import AttentionShape, LoadedModel

try:  # transformers >= 5.2x names the cache keyword ``cache``; earlier 5.x releases ``past_key_values``
    from transformers.generation.utils import ALL_CACHE_NAMES

    CACHE_KEYWORD = "cache" if "cache" in ALL_CACHE_NAMES else "past_key_values"
except ImportError:  # pragma: no cover - depends on the installed transformers
    CACHE_KEYWORD = "past_key_values"

RankSpec = str | int | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor


def rank_table(ranks: RankSpec, shape: AttentionShape) -> torch.Tensor:
    """``(L, Hkv)`` int64 ranks from ``"full"``, one int, one rank per layer, or one per layer and key/value head.

    Raises:
        ValueError: another string, a table of the wrong shape, or a rank outside ``[1, d]``.
    """
    if isinstance(ranks, str):
        if ranks != "full":
            raise ValueError(f"ranks must be 'full', an int, or one rank per layer (or layer and head), got {ranks!r}")
        ranks = shape.head_dim
    table = torch.as_tensor(ranks, dtype=torch.int64)
    if table.dim() == 0:
        table = table.expand(shape.num_layers)
    if table.shape[0] != shape.num_layers or table.dim() > 2:
        raise ValueError(
            f"ranks must have one entry per layer ({shape.num_layers}) or one row of {shape.kv_heads} per layer, "
            f"got shape {tuple(table.shape)}"
        )
    return torch.stack([as_rank_vector(row, shape.kv_heads, shape.head_dim) for row in table])


def key_validity(call: AttentionCall) -> torch.Tensor | None:
    """``(B, n)``: False for keys that no query of the call may attend (left padding); None without a mask."""
    if call.mask is None:
        return None
    return call.mask.any(dim=-2).squeeze(1).expand(call.key.shape[0], -1)


class KeyBasisAttention:
    """Attention handler that runs each layer through a key basis at the layer's ranks (module docstring).

    Args:
        ranks: ``(L, Hkv)`` from :func:`rank_table`.
        kind: ``separate``, ``joint`` or ``calibrated`` (``drrl_env.kv_basis``).
        calibrated: per layer, the ``calibrated`` bases (None for the per-prompt kinds).
        cache: the generation's :class:`LowRankKeyCache`, or None for a plain forward pass (each
            call then computes, or takes, its basis and uses it for that call only).
    """

    def __init__(
        self,
        ranks: torch.Tensor,
        kind: str,
        calibrated: Sequence[KeyBasis | None] | None = None,
        cache: LowRankKeyCache | None = None,
    ) -> None:
        check_basis_kind(kind)
        if kind not in PER_PROMPT_KINDS and calibrated is None:
            raise ValueError(f"basis {kind!r} needs its calibrated bases")
        self.ranks, self.kind, self.calibrated, self.cache = ranks, kind, calibrated, cache

    def _basis(self, call: AttentionCall) -> tuple[KeyBasis, torch.Tensor]:
        """The layer's basis and the call's keys in it ``(B, Hkv, n, R)``; computes a per-prompt basis once."""
        layer = None if self.cache is None else self.cache.layers[call.layer]
        if layer is not None and layer.basis is not None:
            return layer.basis, call.key  # the cache stored the keys projected
        if self.calibrated is not None:
            basis = self.calibrated[call.layer]
        else:
            if call.query.shape[-2] != call.key.shape[-2]:
                raise ValueError("a per-prompt key basis is computed at the prefill, where queries and keys align")
            gram_q, gram_k = group_grams(call.query, call.key, key_validity(call))
            basis = basis_from_grams(gram_q, gram_k, self.ranks[call.layer], self.kind)
            basis = basis.to(call.query.dtype, call.query.device)
        keys = basis.project_keys(call.key) if layer is None else layer.set_basis(basis)
        return basis, keys

    def __call__(self, call: AttentionCall) -> torch.Tensor:
        if bool((self.ranks[call.layer] == call.query.shape[-1]).all()):
            return call.full()
        basis, keys = self._basis(call)
        queries = basis.project_queries(call.query)
        # Several queries (the prefill): fused SDPA at zero-padded width; one query (decode): width R, unfused.
        return attend(queries, keys, call.value, call.scale, call.mask, fused=queries.shape[-2] > 1)


def calibrated_bases(
    loaded: LoadedModel, ranks: torch.Tensor, calibration: CalibrationGrams | None = None
) -> list[KeyBasis | None]:
    """Per layer, the ``calibrated`` basis in the model's dtype and device (None for full-rank layers)."""
    calibration = calibration_grams(loaded) if calibration is None else calibration
    dtype, device = loaded.model.dtype, loaded.device
    head_dim = loaded.attention_shape.head_dim
    return [
        None if bool((row == head_dim).all()) else basis.to(dtype, device)
        for row, basis in zip(ranks, calibration.bases(ranks), strict=True)
    ]


@torch.no_grad()
def generate(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    ranks: RankSpec,
    *,
    basis: str = "joint",
    max_new_tokens: int = 32,
    calibration: CalibrationGrams | None = None,
    **generate_kwargs: Any,
) -> Any:
    """``loaded.model.generate`` with each layer's keys cached at its rank in ``basis`` (module docstring).

    Args:
        loaded: what :func:`drrl_env.models.load_causal_lm` returns.
        input_ids: ``(B, n)`` prompts (pass ``attention_mask`` for left-padded batches).
        ranks: ``"full"``, one int, one rank per layer, or ``(L, Hkv)`` (see :func:`rank_table`).
        basis: ``separate``, ``joint`` or ``calibrated``.
        max_new_tokens: tokens to generate.
        calibration: the Grams of a ``calibrated`` basis (default: :func:`calibration_grams`).
        **generate_kwargs: passed to ``model.generate`` (``do_sample``, ``attention_mask``, ...).

    Returns:
        What ``model.generate`` returns; with ``return_dict_in_generate=True`` its cache is the
        :class:`LowRankKeyCache`.
    """
    check_basis_kind(basis)
    for name in ("cache", "past_key_values", "use_cache"):
        if name in generate_kwargs:
            raise ValueError(f"generate() makes its own low-rank key cache; do not pass {name}=")
    shape = loaded.attention_shape
    table = rank_table(ranks, shape)
    calibrated = calibrated_bases(loaded, table, calibration) if basis == "calibrated" else None
    cache = LowRankKeyCache(table, shape.head_dim, calibrated)
    handler = KeyBasisAttention(table, basis, calibrated, cache)
    hook = install(loaded.model)
    with hook.use(handler):
        return loaded.model.generate(
            input_ids=input_ids.to(loaded.device),
            max_new_tokens=max_new_tokens,
            use_cache=True,
            **{CACHE_KEYWORD: cache},
            **generate_kwargs,
        )
