"""Label-free KL profiles of an input: what each layer's (or key/value group's) rank costs on it.

Measured by forward passes (:func:`layer_kl_profile`, :func:`unit_kl_profile`) or estimated (:func:`kl_profile`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from drrl_env.attention.hook import AttentionCall, install, segment_spans
from drrl_env.lm.models import LoadedModel
from drrl_env.lm.scoring import next_token_kl
from drrl_env.profiles.delta_scale import estimated_profile
from drrl_env.profiles.sensitivity import candidates_below_full

PROFILE_ESTIMATES = ("exact", "fisher", "scaled_delta")
"""how a layer KL profile is measured: one forward per cell (:func:`layer_kl_profile`), its Fisher estimate, or
the input's output-delta energy times a Fisher scale fitted on validation text (:mod:`drrl_env.profiles.delta_scale`)"""


FISHER_SAMPLES = 16
"""label samples of the Fisher estimate (its agreement with the exact profile: docs/findings.md)"""


def decoder_layers(model: torch.nn.Module, num_layers: int) -> torch.nn.ModuleList | None:
    """The model's ``num_layers`` decoder layers (Llama's ``model.layers``, GPT-2's ``transformer.h``), if found."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return module
    return None


def _replicated(output: Any, copies: int) -> Any:
    """A decoder layer's recorded output with its batch repeated ``copies`` times (a tensor, or a tuple's first)."""
    if isinstance(output, torch.Tensor):
        return output.repeat(copies, *([1] * (output.dim() - 1)))
    return (_replicated(output[0], copies), *output[1:])


@contextlib.contextmanager
def _skip_layers_before(layers: torch.nn.ModuleList, first: int, handed_on: Any) -> Iterator[None]:
    """Within the block, layers ``0 .. first - 1`` do not run: each returns ``handed_on`` (layer ``first``'s input)."""
    for layer in layers[:first]:
        layer.forward = lambda *args, **kwargs: handed_on  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        for layer in layers[:first]:
            del layer.forward


def layer_kl_profile(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    ranks: tuple[int, ...],
    mode: str = "separate",
    segment_len: int | None = None,
) -> np.ndarray:
    """``(L, K)`` mean per-token KL from the full model's next-token distribution, one layer at one rank at a time.

    Args:
        loaded: the model.
        input_ids: ``(B, n)`` the batch (no labels are used: only the model's distributions).
        ranks: ascending candidate ranks; a rank ``>= head_dim`` costs 0 (it is full attention).
        mode: spectral mode of the low-rank attention.
        segment_len: query segments per layer call, as in the env (every segment of layer ``l`` at the rank).
    """
    return unit_kl_profile(loaded, input_ids, ranks, mode, segment_len)[:, 0]


@torch.no_grad()
def unit_kl_profile(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    ranks: tuple[int, ...],
    mode: str = "separate",
    segment_len: int | None = None,
    per_head: bool = False,
    per_segment: bool = False,
) -> np.ndarray:
    """``(L, U, K)``: :func:`layer_kl_profile` of finer units, one unit of one layer at one rank at a time.

    A unit is the whole layer (``U = 1``), one key/value head group (``per_head``: the others stay
    at full rank), one query segment of ``segment_len`` (``per_segment``: the other segments of the
    layer stay full) or one head in one segment (both; ``U = S * Hkv``, segment-major). Each
    layer's units and candidates share one replicated forward, as the layer profile's candidates do.
    """
    if per_segment and segment_len is None:
        raise ValueError("per_segment needs a segment_len (the query segments the units are made of)")
    model, hook = loaded.model, install(loaded.model)
    shape = loaded.attention_shape
    input_ids = input_ids.to(loaded.device)
    rows = input_ids.shape[0]
    layers = decoder_layers(model, shape.num_layers)
    outputs: dict[int, Any] = {}
    recorders = [] if layers is None else [
        layer.register_forward_hook(lambda module, args, output, j=j: outputs.__setitem__(j, output))
        for j, layer in enumerate(layers)
    ]  # fmt: skip
    try:
        with hook.use(None, segment_len):
            full_logits = model(input_ids=input_ids).logits  # (B, n, V)
    finally:
        for recorder in recorders:
            recorder.remove()
    below, table = candidates_below_full(ranks, shape)
    heads = shape.kv_heads if per_head else 1
    segments = len(segment_spans(input_ids.shape[1], segment_len)) if per_segment else 1
    cost = np.zeros((shape.num_layers, segments * heads, len(ranks)))
    if not below:
        return cost
    table, replica_segment = _unit_table(table, shape.head_dim, segments, heads)  # replica u*C + c: unit u at c
    copies = table.shape[0]
    replicated = input_ids.repeat(copies, 1)  # replica r is rows r*B .. (r+1)*B - 1
    for layer in range(shape.num_layers):

        def handler(call: AttentionCall, layer: int = layer) -> torch.Tensor:
            if call.layer != layer:
                return call.full()
            original = dataclasses.replace(
                call,
                query=call.query[:rows],
                key=call.key[:rows],
                value=call.value[:rows],
                mask=None if call.mask is None else call.mask[:rows],
                hidden_states=None,
            )  # the replicas are identical up to here: one set of spectra serves every candidate
            ranks_now = table
            if replica_segment is not None:  # replicas of other segments' units are full in this one
                ranks_now = table.masked_fill((replica_segment != call.segment).unsqueeze(1), shape.head_dim)
            return original.low_rank(ranks_now, mode).flatten(0, 1)  # (R, B, Hq, m, d) -> (R * B, Hq, m, d)

        prefix = contextlib.nullcontext()
        if layers is not None and layer > 0:
            prefix = _skip_layers_before(layers, layer, _replicated(outputs[layer - 1], copies))
        with hook.use(handler, segment_len), prefix:
            logits = model(input_ids=replicated).logits  # (R * B, n, V)
        for replica in range(copies):
            unit, c = divmod(replica, len(below))
            cost[layer, unit, below[c]] = next_token_kl(full_logits, logits[replica * rows : (replica + 1) * rows])
    return cost


def _unit_table(
    table: torch.Tensor, head_dim: int, segments: int, heads: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``(U * C, Hkv)`` rank table of every unit at every candidate, and each replica's segment (None: all).

    Unit ``u = s * heads + h``: with ``heads > 1`` only group ``h`` takes the candidate, the others stay full.
    """
    candidates, kv_heads = table.shape
    units = segments * heads
    unit_table = table.repeat(units, 1)
    if heads > 1:
        unit_head = torch.arange(units).repeat_interleave(candidates) % heads  # (U * C,)
        others = unit_head.unsqueeze(1) != torch.arange(kv_heads).unsqueeze(0)
        unit_table = unit_table.masked_fill(others, head_dim)
    if segments == 1:
        return unit_table, None
    return unit_table, torch.arange(units).repeat_interleave(candidates) // heads


def kl_profile(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    ranks: tuple[int, ...],
    mode: str,
    segment_len: int | None,
    estimate: str = "exact",
    per_head: bool = False,
    samples: int = FISHER_SAMPLES,
) -> np.ndarray:
    """``(L, K)`` layer KL profile of the batch (``(L, Hkv, K)`` per head): measured exactly, or estimated.

    ``samples``: label samples of the Fisher estimate (backward passes; for 'scaled_delta', of its scale's fit).
    """
    if estimate == "exact":
        if per_head:
            return unit_kl_profile(loaded, input_ids, ranks, mode, segment_len, per_head=True)
        return layer_kl_profile(loaded, input_ids, ranks, mode, segment_len)
    if estimate in ("fisher", "scaled_delta"):
        return estimated_profile(loaded, input_ids, ranks, mode, segment_len, estimate, samples, per_head)
    raise ValueError(f"profile estimate must be one of {PROFILE_ESTIMATES}, got {estimate!r}")
