"""The input's sensitivity profile: what each layer's rank costs on this input, estimated without its labels.

``cost[l, k]`` is the mean per-token ``KL(p_full || p)`` of the next-token distribution when layer
``l`` alone runs at candidate rank ``k`` (measured exactly, one forward per cell, by
:func:`drrl_env.profiles.kl.layer_kl_profile`). To second order in the change ``delta[l, k]`` of layer
``l``'s attention output (low-rank minus full),

    KL ~= 1/2 * delta^T J^T F J delta,    F = E_{y ~ p_full}[(e_y - p)(e_y - p)^T] per position,

where ``J`` is the Jacobian of the logits with respect to that attention output: the Fisher
information of the next-token distributions, the quantity Palu allocates its ranks by. With
labels ``y`` sampled from the full model itself (no labels of the text are used), the gradient
``g = d sum_t log p(y_t) / d output`` satisfies ``E[(g . delta)^2] = delta^T J^T F J delta``, so

    cost[l, k] ~= 1/2 * mean over samples of (g_l . delta[l, k])^2 / tokens        (Eq. F)

needs one forward with the candidates' outputs, computed from the same spectra, and one backward
pass per sample, whatever ``L`` and ``K`` are (:func:`fisher_kl_profile`). The cost of the estimate
is noise: one sample is a chi-square variable with one degree of freedom (relative spread
``sqrt(2 / samples)``), and the second-order model misses what the exact profile sees at low ranks
(docs/findings.md measures how well its allocations agree with the exact ones).

The profile serves three users: the hindsight oracle and the static allocation spend a budget over
it by the marginal water-fill (:func:`allocate_ranks`), and the env shows it to the agent
(``sensitivity_samples > 0``: :func:`sensitivity_features`, the observation's ``sensitivity`` part).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from drrl_env.attention.hook import AttentionCall, install
from drrl_env.lm.models import AttentionShape, LoadedModel
from drrl_env.profiles.waterfill import allocate_ranks


@contextlib.contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """Within the block no parameter requires a gradient (the backward passes need only the activations')."""
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def candidates_below_full(ranks: tuple[int, ...], shape: AttentionShape) -> tuple[list[int], torch.Tensor]:
    """The candidates below ``head_dim`` (the cells a profile fills): their indices and ``(C, Hkv)`` rank table."""
    below = [k for k, rank in enumerate(ranks) if rank < shape.head_dim]
    return below, torch.tensor([[ranks[k]] * shape.kv_heads for k in below], dtype=torch.int64).view(-1, shape.kv_heads)


def fisher_kl_profile(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    ranks: tuple[int, ...],
    mode: str = "separate",
    segment_len: int | None = None,
    samples: int = 16,
    seed: int = 0,
    per_head: bool = False,
) -> np.ndarray:
    """``(L, K)`` Fisher estimate (Eq. F) of :func:`drrl_env.profiles.kl.layer_kl_profile`, label-free.

    With ``per_head``: ``(L, Hkv, K)``, the estimate of :func:`drrl_env.profiles.kl.unit_kl_profile`'s per-head
    profile (key/value group ``h`` alone at rank ``k``). Each group's truncation changes only the outputs of
    its own query heads (query head ``i`` reads group ``i // (Hq / Hkv)``), so the same forward, deltas and
    backward passes give every group's ``g . delta`` by summing over that group's heads only: no extra cost.

    Args:
        loaded: the model.
        input_ids: ``(B, n)`` the batch.
        ranks: ascending candidate ranks; a rank ``>= head_dim`` costs 0.
        mode: spectral mode of the low-rank attention.
        segment_len: query segments per layer call, as in the env (every segment of a layer at the rank).
        samples: label samples drawn from the full model per position (backward passes).
        seed: seed of the label samples.
        per_head: one profile row per key/value group of each layer.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    model, hook = loaded.model, install(loaded.model)
    shape = loaded.attention_shape
    input_ids = input_ids.to(loaded.device)
    rows, tokens = input_ids.shape
    below, table = candidates_below_full(ranks, shape)
    heads = shape.kv_heads if per_head else 1
    cost = np.zeros((shape.num_layers, heads, len(ranks)))
    if not below:
        return cost if per_head else cost[:, 0]
    taps: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (layer, zero tap, (C, B, Hq, m, d) deltas)

    def handler(call: AttentionCall) -> torch.Tensor:
        full = call.full()
        with torch.no_grad():
            delta = call.low_rank(table, mode) - full.detach()  # one set of spectra serves every candidate
        tap = torch.zeros_like(full, requires_grad=True)  # d loss / d tap = d loss / d (this attention output)
        taps.append((call.layer, tap, delta))
        return full + tap

    with _frozen(model), torch.enable_grad(), hook.use(handler, segment_len):
        logits = model(input_ids=input_ids).logits.float()  # (B, n, V)
        log_p = torch.log_softmax(logits, dim=-1)
        generator = torch.Generator(device=log_p.device).manual_seed(seed)
        probabilities = log_p.detach().exp().flatten(0, 1)  # (B * n, V)
        squares = torch.zeros(shape.num_layers, len(below), rows, heads, dtype=torch.float64)
        for sample in range(samples):
            labels = torch.multinomial(probabilities, 1, generator=generator).view(rows, tokens, 1)
            log_likelihood = log_p.gather(-1, labels).sum()
            gradients = torch.autograd.grad(
                log_likelihood, [tap for _, tap, _ in taps], retain_graph=sample < samples - 1
            )
            projections = torch.zeros(shape.num_layers, len(below), rows, heads, dtype=torch.float64)
            for (layer, _, delta), gradient in zip(taps, gradients, strict=True):
                per_group = (delta * gradient).unflatten(2, (heads, -1))  # (C, B, heads, Hq / heads, m, d)
                projections[layer] += per_group.sum(dim=(3, 4, 5)).double().cpu()  # g . delta per row and group
            squares += projections**2
    estimate = 0.5 * squares.sum(dim=2) / samples / (rows * tokens)  # (L, C, heads) per token
    cost[:, :, below] = estimate.transpose(1, 2).numpy()
    return cost if per_head else cost[:, 0]


@torch.no_grad()
def delta_energy_profile(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    ranks: tuple[int, ...],
    mode: str = "separate",
    segment_len: int | None = None,
    per_head: bool = False,
) -> np.ndarray:
    """``(L, K)`` (``(L, Hkv, K)`` with ``per_head``): ``||delta[l, k]||^2`` per token, one forward pass.

    The energy of the change of layer ``l``'s attention output (summed over the unit's query heads,
    positions and channels; divided by ``B * n`` tokens) when it alone runs at candidate rank ``k``, every
    layer before it full. Eq. F with the gradient taken as independent of ``delta``: ``cost ~= s * energy``
    with a per-cell scale ``s`` that does not depend on the input; no backward pass, no labels.
    """
    model, hook = loaded.model, install(loaded.model)
    shape = loaded.attention_shape
    input_ids = input_ids.to(loaded.device)
    below, table = candidates_below_full(ranks, shape)
    heads = shape.kv_heads if per_head else 1
    energy = np.zeros((shape.num_layers, heads, len(ranks)))
    if not below:
        return energy if per_head else energy[:, 0]

    def handler(call: AttentionCall) -> torch.Tensor:
        full = call.full()
        delta = (call.low_rank(table, mode) - full).unflatten(2, (heads, -1))  # (C, B, heads, Hq / heads, m, d)
        energy[call.layer][:, below] += delta.double().pow(2).sum(dim=(1, 3, 4, 5)).T.cpu().numpy()
        return full

    with hook.use(handler, segment_len):
        model(input_ids=input_ids)
    energy /= input_ids.numel()
    return energy if per_head else energy[:, 0]


SENSITIVITY_FLOOR = 1e-6
"""KL per token below which a cost is shown as this floor (log scale; full rank costs 0)"""


def sensitivity_width(num_candidates: int, units: int = 1) -> int:
    """Width of the observation's ``sensitivity`` part: two profile rows and the water-fill's choice, one-hot.

    ``units``: profile rows per layer (``Hkv`` with per-head ranks); each of the three parts is per unit.
    """
    return 3 * num_candidates * units


def sensitivity_features(profile: np.ndarray, layer: int, shares: np.ndarray, budget_left: float) -> np.ndarray:
    """The observation's ``sensitivity`` part at ``layer``, ``(3K,)``, or ``(3 U K,)`` for a ``(L, U, K)`` profile.

    * ``log10(cost[layer, k] + floor)`` for each candidate ``k``: what this layer's rank costs on this input;
    * ``log10(sum_{j > layer} cost[j, k] + floor)``: what the later layers' ranks cost (the floor after the last);
    * one-hot over the candidates: the one the water-fill (:func:`allocate_ranks`) of ``budget_left`` (the mean
      share the remaining steps may use) over layers ``layer .. L - 1`` of the profile gives this layer, i.e. the
      hindsight oracle's choice re-planned from here, whatever was played before (one-hot, so that a categorical
      policy maps it to its action by one weight per candidate).

    With a per-unit profile ``(L, U, K)`` (one row per key/value group: ``fisher_kl_profile(per_head=True)``)
    each part is ``(U, K)``, unit-major (as the observation's ``ner``), and the water-fill runs over every unit
    of the layers from ``layer`` on.

    Args:
        profile: ``(L, K)`` or ``(L, U, K)`` the input's cost (:func:`fisher_kl_profile`).
        layer: the current layer.
        shares: ``(K,)`` logit-FLOPs share of each candidate (:func:`rank_shares`).
        budget_left: the mean share the remaining steps may use (1 without a budget).
    """
    units = profile.reshape(profile.shape[0], -1, profile.shape[-1])  # (L, U, K)
    count, num_candidates = units.shape[1:]
    later = units[layer + 1 :].sum(axis=0)  # zeros after the last layer (an empty sum)
    chosen = allocate_ranks(units[layer:].reshape(-1, num_candidates), shares, budget_left)[:count]
    plan = np.eye(num_candidates)[chosen]  # (U, K)
    return np.concatenate(
        [np.log10(units[layer] + SENSITIVITY_FLOOR).ravel(), np.log10(later + SENSITIVITY_FLOOR).ravel(), plan.ravel()]
    )
