"""The seam between a HF causal LM and drrl: an attention function registered as ``"drrl"``.

The function is registered in transformers' ``AttentionInterface`` (and a boolean mask builder
in its ``AttentionMaskInterface``) under that name.

``install(model)`` routes every attention layer of ``model`` through ``drrl_attention``. For each
layer call, the attention is split into segments of ``segment_len`` queries (one segment when
``segment_len`` is None), and each segment is handed, as an :class:`AttentionCall` carrying the
layer's post-RoPE Q, K, V, to the *handler* of the calling thread. The handler returns that
segment's output, which replaces the full attention output in the forward pass, so later layers
see its effect. With no handler the layer computes full attention and the model is unchanged.
A module may instead have a cache layer bound to it (``BOUND_LAYER``, set by
:func:`drrl_env.generation.static_cache.bind`): once that layer is ready, it attends by itself, without the
per-context handler lookup, which ``torch.compile`` cannot trace.

Handlers are per execution context (a ``contextvars.ContextVar``: each thread and each greenlet has its own):
several environments may share one loaded model, each running its own forward pass in its own thread or greenlet
(``drrl_env.lm.runner``). Inference only: dropout is not applied.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from drrl_env.attention.lowrank import (
    LogitCore,
    SpectralMode,
    as_rank_vector,
    attend,
    full_attention,
    logit_core_svd,
    low_rank_attention,
)
from drrl_env.attention.spectra import BlockSpectrum, block_spectrum

if TYPE_CHECKING:  # drrl_env.profiles.calibration imports this module
    from drrl_env.attention.kv_basis import CalibrationGrams, KeyBasis

ATTENTION_NAME = "drrl"
BOUND_LAYER = "_drrl_cache_layer"
"""attribute of an attention module holding a cache layer that attends by itself (``generation.static_cache.bind``)"""


class UnsupportedModelError(TypeError):
    """The model's attention cannot be routed through transformers' ``AttentionInterface``."""


@dataclass
class AttentionCall:
    """One segment of one layer's attention, as the hook hands it to a handler.

    Attributes:
        layer: index of the decoder layer.
        segment: index of the query segment in this layer, ``0 .. num_segments - 1``.
        num_segments: number of query segments of this layer call.
        query: ``(B, Hq, m, d)`` post-RoPE queries of the segment.
        key: ``(B, Hkv, n, d)`` post-RoPE keys visible to the segment (all keys up to its end).
        value: ``(B, Hkv, n, d)`` values visible to the segment.
        mask: boolean ``(B, 1, m, n)`` (True = attend), or None for plain causal attention.
        scale: the model's logit scale (``1/sqrt(d)`` for standard models).
        hidden_states: ``(B, m, hidden)`` input of the attention module for the segment's tokens
            (after the layer's input norm), or None where the module was called without it.
        calibration: the model's calibration Grams (the ``calibrated`` spectral mode), or None.
    """

    layer: int
    segment: int
    num_segments: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    scale: float
    hidden_states: torch.Tensor | None = None
    calibration: CalibrationGrams | None = None

    @cached_property
    def query_spectrum(self) -> BlockSpectrum:
        """Spectra of the per-head query blocks, ``(B, Hq, d)``, computed once."""
        return block_spectrum(self.query)

    @cached_property
    def key_spectrum(self) -> BlockSpectrum:
        """Spectra of the per-head key blocks, ``(B, Hkv, d)``, computed once."""
        return block_spectrum(self.key)

    @cached_property
    def logit_core(self) -> LogitCore:
        """SVD of the logits' ``d x d`` core per query head (``lowrank.logit_core_svd``), computed once."""
        return logit_core_svd(self.query_spectrum, self.key_spectrum)

    def rows(self, start: int, stop: int) -> AttentionCall:
        """The call of batch rows ``start:stop`` alone (one episode of a batched forward pass, ``drrl_env.vector``).

        Spectra already computed for the whole batch (one batched ``eigh``) are handed down as slices, so the rows'
        spectra are exactly those the rows would have had alone: every block is decomposed on its own.
        """
        rows = slice(start, stop)
        batched = self.mask is not None and self.mask.shape[0] > 1
        part = AttentionCall(
            self.layer,
            self.segment,
            self.num_segments,
            self.query[rows],
            self.key[rows],
            self.value[rows],
            self.mask[rows] if batched else self.mask,
            self.scale,
            None if self.hidden_states is None else self.hidden_states[rows],
            self.calibration,
        )
        for name in ("query_spectrum", "key_spectrum"):
            if name in self.__dict__:
                spectrum = self.__dict__[name]
                part.__dict__[name] = BlockSpectrum(spectrum.singular_values[rows], spectrum.right_vectors[rows])
        if "logit_core" in self.__dict__:
            part.__dict__["logit_core"] = tuple(factor[rows] for factor in self.__dict__["logit_core"])
        return part

    @cached_property
    def _full_output(self) -> torch.Tensor:
        return full_attention(self.query, self.key, self.value, self.scale, self.mask)

    def full(self) -> torch.Tensor:
        """Full attention output of the segment, ``(B, Hq, m, d)``, computed once (the oracle and the step share it)."""
        return self._full_output

    def low_rank(self, rank: int | torch.Tensor, mode: SpectralMode = "separate") -> torch.Tensor:
        """Low-rank attention output of the segment at ``rank``.

        ``(B, Hq, m, d)`` for a scalar or per key/value head ranks, ``(K, B, Hq, m, d)`` for a
        ``(K, Hkv)`` table of candidates.

        Rank ``d`` in every head is full attention, and is computed as such (no projection): the
        output is then exactly :meth:`full`'s. ``calibrated`` (``drrl_env.attention.lowrank``) needs
        :attr:`calibration`.
        """
        d = self.query.shape[-1]
        ranks = torch.as_tensor(rank)
        if ranks.dim() < 2 and bool((ranks == d).all()):
            return self.full()
        if mode == "calibrated":
            output = self._calibrated_low_rank(rank)
        else:
            core = self.logit_core if mode == "joint" else None
            output = low_rank_attention(
                self.query,
                self.key,
                self.value,
                rank,
                mode,
                self.scale,
                self.mask,
                self.query_spectrum,
                self.key_spectrum,
                core=core,
            )
        if ranks.dim() == 2:  # rows with every head at rank d: full attention, exactly
            full_rows = (ranks == d).all(dim=1)
            output[full_rows.to(output.device)] = self.full().to(output.dtype)
        return output

    def calibrated_basis(self, ranks: torch.Tensor) -> KeyBasis:
        """The layer's calibrated group basis (float64) at ``ranks (Hkv,)``.

        Raises:
            ValueError: the model has no calibration on its hook.
        """
        if self.calibration is None:
            raise ValueError(
                "spectral mode 'calibrated' needs the model's calibration on its hook "
                "(drrl_env.profiles.calibration.attach_calibration)"
            )
        return self.calibration.layer_basis(self.layer, ranks)

    def _calibrated_low_rank(self, rank: int | torch.Tensor) -> torch.Tensor:
        """Attention through the layer's calibrated group bases: ``(B, Hq, m, d)``, or ``(K, ...)`` for a table."""
        table = as_rank_vector(rank, self.key.shape[1], self.query.shape[-1])
        outputs = []
        for row in table.view(-1, table.shape[-1]):
            basis = self.calibrated_basis(row).to(self.query.dtype, self.query.device)
            query, key = basis.project_queries(self.query), basis.project_keys(self.key)
            outputs.append(attend(query, key, self.value, self.scale, self.mask))
        return outputs[0] if table.dim() == 1 else torch.stack(outputs)


Handler = Callable[[AttentionCall], torch.Tensor]


def segment_spans(q_len: int, segment_len: int | None) -> list[tuple[int, int]]:
    """Query row ranges ``[start, stop)`` of the segments of ``segment_len`` queries (None: one segment)."""
    length = segment_len or q_len
    return [(start, min(start + length, q_len)) for start in range(0, q_len, length)]


@dataclass
class _HookState:
    """What one thread or greenlet routes: its handler, segment length, and the last attention input captured."""

    handler: Handler | None = None
    segment_len: int | None = None
    attention_input: torch.Tensor | None = None


_NO_HANDLER = _HookState()


class AttentionHook:
    """Per-model state of the hook: each thread's or greenlet's handler and segment length, and the calibration.

    ``modules`` are the model's hooked attention modules in layer order. ``calibration`` (the Grams of the
    ``calibrated`` spectral mode, shared by every thread) is handed to each :class:`AttentionCall`;
    :func:`drrl_env.profiles.calibration.attach_calibration` sets it.
    """

    def __init__(self, modules: Sequence[torch.nn.Module]) -> None:
        self.modules = sorted(modules, key=lambda module: module.layer_idx)
        self.num_layers = len(self.modules)
        self._state: contextvars.ContextVar[_HookState | None] = contextvars.ContextVar("drrl_hook", default=None)
        self.calibration: CalibrationGrams | None = None

    @property
    def _current(self) -> _HookState:
        """The calling context's state (a thread's or a greenlet's; a fresh context routes nothing)."""
        state = self._state.get()
        return _NO_HANDLER if state is None else state

    @property
    def handler(self) -> Handler | None:
        return self._current.handler

    @contextlib.contextmanager
    def use(self, handler: Handler | None, segment_len: int | None = None) -> Iterator[None]:
        """Route this context's attention calls to ``handler`` (segments of ``segment_len`` queries) in the block.

        The context is the calling thread's or greenlet's: others sharing the model are not affected.
        """
        token = self._state.set(_HookState(handler, segment_len))
        try:
            yield
        finally:
            self._state.reset(token)

    def capture_input(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of attention modules: keep this context's attention input for the handler."""
        bound = getattr(module, BOUND_LAYER, None)
        if bound is not None and bound.ready:  # no handler is called
            return
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "_attn_implementation", ATTENTION_NAME) != ATTENTION_NAME:
            return  # the model attends through another implementation now (e.g. sdpa): nothing reads the input
        state = self._state.get()
        if state is not None and state.handler is not None:
            state.attention_input = args[0] if args else kwargs.get("hidden_states")

    def segments(self, q_len: int) -> list[tuple[int, int]]:
        """Query row ranges ``[start, stop)`` of the segments of a layer call with ``q_len`` queries."""
        return segment_spans(q_len, self._current.segment_len)

    def __call__(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        """Attention of one layer, ``(B, Hq, m, d)``, segment by segment through the handler."""
        m, n = query.shape[-2], key.shape[-2]
        mask = _boolean_mask(attention_mask, query.dtype)
        if mask is None and not getattr(module, "is_causal", True):
            mask = torch.ones(1, 1, m, n, dtype=torch.bool, device=query.device)
        handler = self.handler
        if handler is None:
            return full_attention(query, key, value, scale, mask)
        hidden = self._current.attention_input
        if hidden is not None and hidden.shape[-2] != m:
            hidden = None
        spans = self.segments(m)
        outputs = []
        for index, (start, stop) in enumerate(spans):
            visible = n - m + stop  # keys up to the last query of the segment
            call = AttentionCall(
                layer=int(module.layer_idx),
                segment=index,
                num_segments=len(spans),
                query=query[:, :, start:stop],
                key=key[:, :, :visible],
                value=value[:, :, :visible],
                mask=None if mask is None else mask[:, :, start:stop, :visible],
                scale=scale,
                hidden_states=None if hidden is None else hidden[:, start:stop],
                calibration=self.calibration,
            )
            outputs.append(handler(call))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


def _boolean_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """HF masks are boolean (True = attend) for our mask function; additive float masks are converted."""
    if attention_mask is None or attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def drrl_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """The function registered as ``"drrl"`` in ``AttentionInterface`` (HF's calling convention)."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    bound = getattr(module, BOUND_LAYER, None)  # no per-context lookup: what torch.compile can trace
    if bound is not None and bound.ready:
        output = bound.attend(query, key, value, _boolean_mask(attention_mask, query.dtype), scale)
        return output.transpose(1, 2).contiguous(), None
    hook: AttentionHook | None = getattr(module, "_drrl_hook", None)
    if hook is None:
        raise RuntimeError("this attention module is not hooked: call drrl_env.attention.hook.install(model) first")
    output = hook(module, query, key, value, attention_mask, scale)  # (B, Hq, m, d)
    return output.transpose(1, 2).contiguous(), None  # (B, m, Hq, d)


AttentionInterface.register(ATTENTION_NAME, drrl_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def install(model: PreTrainedModel) -> AttentionHook:
    """Route ``model``'s attention through drrl; idempotent. Returns the model's :class:`AttentionHook`.

    Raises:
        UnsupportedModelError: the model class does not dispatch attention through
            ``AttentionInterface``, or no attention module with a ``layer_idx`` was found.
    """
    existing = getattr(model, "_drrl_hook", None)
    if existing is not None:
        return existing
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if not getattr(type(model), "_supports_attention_backend", False):
        raise UnsupportedModelError(
            f"model type {model_type!r} ({type(model).__name__}) does not support transformers' "
            "AttentionInterface, so drrl cannot replace its attention"
        )
    num_layers = int(model.config.num_hidden_layers)
    attention_modules = [
        module
        for module in model.modules()
        if isinstance(getattr(module, "layer_idx", None), int) and "Attention" in type(module).__name__
    ]
    if len(attention_modules) != num_layers:
        raise UnsupportedModelError(
            f"model type {model_type!r}: found {len(attention_modules)} attention modules with a layer_idx, "
            f"expected one per layer ({num_layers})"
        )
    hook = AttentionHook(attention_modules)
    for module in attention_modules:
        module._drrl_hook = hook
        module.register_forward_pre_hook(hook.capture_input, with_kwargs=True)
    model.set_attn_implementation(ATTENTION_NAME)
    model._drrl_hook = hook
    return hook
