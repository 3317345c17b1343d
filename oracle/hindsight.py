"""The hindsight oracle: the per-input layer allocation that knows what each layer's rank costs on this very input.

For the episode's batch, :func:`layer_kl_profile` measures ``cost[l, k]``: the mean per-token
``KL(p_full || p)`` of the next-token distribution when layer ``l`` alone runs at candidate rank
``k`` and every other layer at full attention. It uses no labels: only the model's own
distributions on the input, so choosing on it does not fit the noise of the tokens it is scored
on (a profile of the LM loss does; see docs/results.md). :func:`allocate_ranks` then spends the
episode's budget by the marginal water-fill: starting from the largest candidate everywhere, it
lowers, one candidate at a time, the layer whose ``cost increase / FLOPs saved`` is smallest,
until the mean FLOPs share meets the budget. Under the additive model (the KL of several layers
at once is about the sum of their single-layer KLs) this is the best layer allocation for the
input, so its gap to an allocation that does not see the input (uniform, static) is the headroom
any input-adaptive agent can aim at.

Cost: one full forward, then per layer ``l`` one forward of the batch replicated once per
candidate below full rank, in which the layers before ``l`` do not run: they hand on the output
the full forward recorded (prefix reuse), and the candidates' outputs at layer ``l`` come from one
set of spectra of the original rows. That is about ``L * (K - 1) / 2`` sequence-forwards of the
decoder (plus ``L * (K - 1)`` of the LM head) per batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from drrl_env.delta_scale import estimated_profile
from drrl_env.env import DRRLAttentionEnv
from drrl_env.guardrail import nearest_allowed, nearest_allowed_per_group
from drrl_env.hook import AttentionCall, install, segment_spans
from drrl_env.models import LoadedModel
from drrl_env.reward import next_token_kl
from drrl_env.sensitivity import candidates_below_full, rank_shares, waterfill_indices

PROFILE_ESTIMATES = ("exact", "fisher", "scaled_delta")
"""how a layer KL profile is measured: one forward per cell (:func:`layer_kl_profile`), its Fisher estimate, or
the input's output-delta energy times a Fisher scale fitted on validation text (:mod:`drrl_env.delta_scale`)"""
FISHER_SAMPLES = 16
"""label samples of the Fisher estimate (measured: cell Spearman 0.98 with the exact profile, 4-5x cheaper)"""


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


class LayerAllocationPolicy:
    """A rank policy that fixes one candidate per layer at each episode's first step, then plays it.

    Subclasses say how in :meth:`allocate`; where the mask forbids a layer's candidate, the
    nearest allowed one is taken. In a ``per_head`` env an allocation's entry per layer may be a
    list of one candidate per key/value group (each group then takes the nearest allowed in its
    part of the group-major mask); a single index is played in every group.
    """

    def __init__(self) -> None:
        self._allocation: list | None = None

    def reset(self, seed: int) -> None:
        del seed
        self._allocation = None

    def allocate(self, env: DRRLAttentionEnv) -> list:
        """Candidate index per layer (or per layer and key/value group) for the episode ``env`` has just started."""
        raise NotImplementedError

    def act(self, observation: np.ndarray, action_mask: np.ndarray, env: DRRLAttentionEnv) -> int | np.ndarray:
        call, ranks = env.attention_call, env.config.ranks
        if self._allocation is None or (call.layer, call.segment) == (0, 0):
            self._allocation = self.allocate(env)
        chosen = self._allocation[call.layer]
        if not env.config.per_head:
            return nearest_allowed(ranks[chosen], action_mask, ranks)
        return nearest_allowed_per_group(np.asarray(ranks)[np.asarray(chosen)], action_mask, ranks)


class HindsightOracle(LayerAllocationPolicy):
    """The hindsight oracle as a rank policy: :func:`allocate_ranks` on this episode's :func:`layer_kl_profile`.

    At an episode's first step it profiles the episode's batch (``env.input_ids``) and allocates
    the episode's budget (``env.budget_share``, in shares of full attention's logit FLOPs, so a
    layer at rank ``r`` costs ``r / d``); then it plays the allocation, taking the nearest allowed
    candidate where the mask forbids a choice. Needs a ``flops_budget``. In a ``per_head`` env it
    profiles and allocates each key/value group of each layer as a unit (:func:`unit_kl_profile`, or its
    Fisher estimate), where the headroom is largest (docs/results.md, section 3).
    ``estimate="fisher"`` profiles by :func:`drrl_env.sensitivity.fisher_kl_profile` with ``samples`` label
    samples (``hindsight:fisher``, ``hindsight:fisher:S``); ``estimate="scaled_delta"`` by
    :func:`drrl_env.delta_scale.scaled_delta_profile` (one forward per input; ``samples`` fit its scale on
    validation text). Where the env already shows that estimate (the same ``sensitivity_estimate`` and
    ``sensitivity_samples == samples``) it is reused.
    """

    def __init__(self, estimate: str = "exact", samples: int = FISHER_SAMPLES) -> None:
        super().__init__()
        if estimate not in PROFILE_ESTIMATES:
            raise ValueError(f"profile estimate must be one of {PROFILE_ESTIMATES}, got {estimate!r}")
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
        self.estimate, self.samples = estimate, samples
        self.last_profile: np.ndarray | None = None
        self.profile_flops = 0.0
        """FLOPs estimate of the last episode's profile (``env.profile_flops``; 0 for the exact one, a ceiling)"""

    @property
    def name(self) -> str:
        if self.estimate == "exact":
            return "hindsight"
        name = f"hindsight:{self.estimate}"
        return name if self.samples == FISHER_SAMPLES else f"{name}:{self.samples}"

    def allocate(self, env: DRRLAttentionEnv) -> list:
        config = env.config
        if env.budget_share is None:
            raise ValueError("the hindsight oracle allocates a FLOPs budget: give the env a flops_budget")
        shown = (config.sensitivity_estimate, config.sensitivity_samples)
        if shown == (self.estimate, self.samples):
            self.last_profile = env.sensitivity_profile  # the same estimate, already made for the observation
        else:
            self.last_profile = kl_profile(
                env.loaded,
                env.input_ids,
                config.ranks,
                config.spectral_mode,
                config.segment_len,
                self.estimate,
                per_head=config.per_head,
                samples=self.samples,
            )  # (L, K), or (L, Hkv, K) per head
        self.profile_flops = 0.0 if self.estimate == "exact" else env.profile_flops(self.estimate, self.samples)
        return waterfill_indices(self.last_profile, rank_shares(config.ranks, env.head_dim), env.budget_share)
