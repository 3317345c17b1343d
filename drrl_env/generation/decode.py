"""Generation with a low-rank key cache, through transformers' own ``generate`` and cache machinery.

:func:`generate` runs ``model.generate`` with a :class:`~drrl_env.generation.kv_cache.LowRankKeyCache` and
the :class:`~drrl_env.generation.kv_attention.KeyBasisAttention` handler on the model's attention hook
(``drrl_env.attention.hook``):

* prefill: for each layer whose ranks are below ``d``, the handler computes the layer's
  :class:`~drrl_env.attention.kv_basis.KeyBasis` from the prompt's post-RoPE queries and keys (padding
  left out), once, and the cache replaces the prompt's keys by their width-``R`` coordinates,
  keeping the keys of each prompt's first ``sink_tokens`` tokens and its last ``recent_tokens``
  exact (:mod:`drrl_env.generation.kv_attention`). A ``calibrated`` basis is known before the prompt (no
  per-prompt spectra). The prefill's own attention is exact (``exact_prefill=False``: it already
  uses the width-``R`` logits);
* each decode step: the cache stores the new key as ``k W_k`` (and keeps it at full width while it
  is among the last ``recent_tokens``); the handler projects the new query with ``W_q`` and attends
  at width ``R`` over the cached keys, exactly over the sinks and the recent window, with
  full-width values.

Layers at rank ``d`` keep full keys and full attention, so ``ranks="full"`` is plain generation.
Sampling, stopping criteria, batching with padding and beam search are transformers' own.
``static=True`` stores the cache in tensors of fixed shapes (:mod:`drrl_env.generation.static_cache`) and
``compiled=True`` has transformers ``torch.compile`` the decode steps over it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import CompileConfig

from drrl_env.attention.hook import install
from drrl_env.attention.kv_basis import CalibrationGrams, KeyBasis, check_basis_kind
from drrl_env.attention.lowrank import as_rank_vector
from drrl_env.generation.kv_attention import RECENT_TOKENS, SINK_TOKENS, KeyBasisAttention
from drrl_env.generation.kv_cache import LowRankKeyCache
from drrl_env.generation.static_cache import StaticLowRankKeyCache, bind, bucket_widths
from drrl_env.lm.models import AttentionShape, LoadedModel
from drrl_env.lm.scoring import next_token_kl
from drrl_env.profiles.calibration import calibration_grams

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
    if isinstance(ranks, torch.Tensor):
        whole = not ranks.dtype.is_floating_point and ranks.dtype != torch.bool
    else:
        values = np.asarray(ranks, dtype=object).ravel()
        whole = all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in values)
    if not whole:
        raise ValueError(f"ranks must be whole numbers (no fractions, booleans or NaN), got {ranks!r}")
    table = torch.as_tensor(ranks, dtype=torch.int64)
    if table.dim() == 0:
        table = table.expand(shape.num_layers)
    if table.shape[0] != shape.num_layers or table.dim() > 2:
        raise ValueError(
            f"ranks must have one entry per layer ({shape.num_layers}) or one row of {shape.kv_heads} per layer, "
            f"got shape {tuple(table.shape)}"
        )
    return torch.stack([as_rank_vector(row, shape.kv_heads, shape.head_dim) for row in table])


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


def key_cache_attention(
    loaded: LoadedModel,
    ranks: RankSpec,
    basis: str,
    calibration: CalibrationGrams | None = None,
    sink_tokens: int = SINK_TOKENS,
    recent_tokens: int = RECENT_TOKENS,
    exact_prefill: bool = True,
    max_tokens: int | None = None,
    static: bool = False,
) -> tuple[LowRankKeyCache | StaticLowRankKeyCache, KeyBasisAttention]:
    """A fresh cache and the handler filling and reading it.

    The cache is a :class:`LowRankKeyCache` (``max_tokens``: its layers' storage, None: grown by concatenation) or,
    with ``static``, a :class:`~drrl_env.generation.static_cache.StaticLowRankKeyCache` of ``max_tokens`` positions
    (required), its key widths bucketed (``static_cache.bucket_widths``).
    """
    check_basis_kind(basis)
    shape = loaded.attention_shape
    table = rank_table(ranks, shape)
    calibrated = calibrated_bases(loaded, table, calibration) if basis == "calibrated" else None
    if static:
        if max_tokens is None:
            raise ValueError("a static key cache needs max_tokens")
        cache = StaticLowRankKeyCache(bucket_widths(table, shape.head_dim), max_tokens)
    else:
        cache = LowRankKeyCache(shape.num_layers, max_tokens)
    return cache, KeyBasisAttention(table, basis, calibrated, cache, sink_tokens, recent_tokens, exact_prefill)


def compile_config(device: torch.device, **options: Any) -> CompileConfig:
    """The ``CompileConfig`` (transformers') for ``generate``'s decode steps on ``device``, CPUs included.

    ``mode`` defaults to ``"reduce-overhead"`` (CUDA graphs) on CUDA and ``"default"`` elsewhere; ``options`` are
    ``CompileConfig``'s (``fullgraph``, ``mode``, ``dynamic``, ``backend``, ``options``).
    """
    options.setdefault("mode", "reduce-overhead" if torch.device(device).type == "cuda" else "default")
    config = CompileConfig(**options)
    config._compile_all_devices = True  # transformers compiles on CUDA-like devices only unless told
    return config


@torch.no_grad()
def generate(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    ranks: RankSpec,
    *,
    basis: str = "joint",
    max_new_tokens: int = 32,
    calibration: CalibrationGrams | None = None,
    sink_tokens: int = SINK_TOKENS,
    recent_tokens: int = RECENT_TOKENS,
    exact_prefill: bool = True,
    preallocate: bool = True,
    static: bool = False,
    compiled: bool = False,
    **generate_kwargs: Any,
) -> Any:
    """``loaded.model.generate`` with each layer's keys cached at its rank in ``basis`` (module docstring).

    Args:
        loaded: what :func:`drrl_env.lm.models.load_causal_lm` returns.
        input_ids: ``(B, n)`` prompts (pass ``attention_mask`` for left-padded batches).
        ranks: ``"full"``, one int, one rank per layer, or ``(L, Hkv)`` (see :func:`rank_table`).
        basis: ``separate``, ``joint`` or ``calibrated``.
        max_new_tokens: tokens to generate.
        calibration: the Grams of a ``calibrated`` basis (default: :func:`calibration_grams`).
        sink_tokens: first tokens of each prompt whose keys stay exact (``drrl_env.generation.kv_attention``).
        recent_tokens: the window of last positions whose keys stay exact for each decode step.
        exact_prefill: attend the prompt exactly (False: through the basis too).
        preallocate: give each cache layer storage for the prompt and ``max_new_tokens``, written in place by each
            decode step (False: it grows by concatenation, a copy of the whole cache a token, as transformers'
            ``DynamicCache`` does).
        static: a cache of fixed shapes (:mod:`drrl_env.generation.static_cache`): each decode step attends over the
            whole storage, masked; what ``compiled`` needs. Greedy, sampling and beam search.
        compiled: ``torch.compile`` the decode steps (transformers' own compilation of ``generate``; implies
            ``static``), with :func:`compile_config` unless ``compile_config=`` is given. The first call compiles
            (a minute on a CPU); later calls with the same shapes and key widths reuse the graph.
        **generate_kwargs: passed to ``model.generate`` (``do_sample``, ``attention_mask``, ...).

    Returns:
        What ``model.generate`` returns; with ``return_dict_in_generate=True`` its cache is the
        :class:`LowRankKeyCache`.
    """
    for name in ("cache", "past_key_values", "use_cache"):
        if name in generate_kwargs:
            raise ValueError(f"generate() makes its own low-rank key cache; do not pass {name}=")
    static = static or compiled
    max_tokens = input_ids.shape[-1] + max_new_tokens if preallocate or static else None
    cache, handler = key_cache_attention(
        loaded, ranks, basis, calibration, sink_tokens, recent_tokens, exact_prefill, max_tokens, static
    )
    if compiled:
        config = generate_kwargs.pop("compile_config", None) or compile_config(loaded.device)
        config._compile_all_devices = True
        generate_kwargs["compile_config"] = config
    elif static:
        generate_kwargs.setdefault("disable_compile", True)  # transformers would compile a static cache on CUDA
    binding = bind(loaded.model, cache) if static else contextlib.nullcontext()
    with install(loaded.model).use(handler), binding:
        return loaded.model.generate(
            input_ids=input_ids.to(loaded.device),
            max_new_tokens=max_new_tokens,
            use_cache=True,
            **{CACHE_KEYWORD: cache},
            **generate_kwargs,
        )


@torch.no_grad()
def teacher_forced_logits(
    loaded: LoadedModel,
    prompt: torch.Tensor,
    continuation: torch.Tensor,
    ranks: RankSpec,
    basis: str = "joint",
    calibration: CalibrationGrams | None = None,
    sink_tokens: int = SINK_TOKENS,
    recent_tokens: int = RECENT_TOKENS,
    exact_prefill: bool = True,
) -> torch.Tensor:
    """Next-token logits ``(B, T, V)`` of the ``T`` tokens of ``continuation`` ``(B, T)`` after ``prompt`` ``(B, n)``.

    The prompt is the prefill (bases computed there, keys compressed); the continuation is then
    read through the low-rank key cache, as decode steps read it (one forward of ``T - 1``
    queries over the cache computes exactly what ``T - 1`` single-token steps would). Row ``t``
    predicts ``continuation[:, t]``: compare it with ``ranks="full"`` for the per-step KL.
    """
    cache, handler = key_cache_attention(loaded, ranks, basis, calibration, sink_tokens, recent_tokens, exact_prefill)
    first = cached_forward(loaded, handler, cache, prompt)[:, -1:]
    if continuation.shape[1] == 1:
        return first
    return torch.cat([first, cached_forward(loaded, handler, cache, continuation[:, :-1])], dim=1)


def cached_forward(
    loaded: LoadedModel, handler: KeyBasisAttention, cache: LowRankKeyCache, input_ids: torch.Tensor
) -> torch.Tensor:
    """Logits ``(B, m, V)`` of one forward of ``input_ids`` through ``cache`` (filled and read by ``handler``)."""
    with install(loaded.model).use(handler):
        return loaded.model(input_ids=input_ids.to(loaded.device), use_cache=True, **{CACHE_KEYWORD: cache}).logits


def quality_against_full(
    loaded: LoadedModel,
    prompt: torch.Tensor,
    generated: torch.Tensor,
    ranks: RankSpec,
    basis: str = "joint",
    max_new_tokens: int = 32,
    **options: Any,
) -> tuple[float, float]:
    """How far generation at ``ranks`` is from full attention's on ``prompt`` ``(1, n)``: (KL, greedy agreement).

    The KL is the mean per-step ``KL(p_full || p)`` teacher-forced on full attention's greedy continuation of
    ``max_new_tokens`` tokens; the agreement, the share of ``generated`` (the low-rank generation's new tokens) equal
    to that continuation. ``options``: :func:`teacher_forced_logits`'s (the exact keys, the prefill, the calibration).
    """
    full = generate(loaded, prompt, "full", max_new_tokens=max_new_tokens, do_sample=False)
    continuation = full[:, prompt.shape[1] :]
    reference = teacher_forced_logits(loaded, prompt, continuation, "full")
    low = teacher_forced_logits(loaded, prompt, continuation, ranks, basis, **options)
    width = min(continuation.shape[1], generated.shape[1])
    agreement = float((generated[:, :width] == continuation[:, :width]).double().mean())
    return next_token_kl(reference, low), agreement
