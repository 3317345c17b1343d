"""Masks of the rank-selection MDP: the perturbation guardrail (Eqs. 9, 11) and the FLOPs budget.

Logit errors are measured on the current layer's (and segment's) logits ``S = Q K^T * scale``
and reported *relative* to ``||S||_F``, so one threshold means the same at every layer, model and
sequence length. Per block (batch element x query head) the numerator is one of:

* ``exact`` guardrail (:func:`truncation_errors`): ``||S - S_r||_F``, the error of rank ``r``
  against *full* attention. In ``joint`` mode it is the tail of the logit core's spectrum
  (Eckart-Young, Eq. 3). In ``separate`` mode ``S - S_r = Q (I - P_q P_q^T P_k P_k^T) K^T``, whose
  squared Frobenius norm is ``tr(B^T G_q B G_k)`` with ``B = I - P_q P_q^T P_k P_k^T`` and the
  ``d x d`` Gram matrices ``G = X^T X`` the spectra already hold. ``S_r`` is ``S`` projected on
  both sides (``Q P_q P_q^T = U_r U_r^T Q``), so by Pythagoras that trace is
  ``||S||_F^2 - ||S_r||_F^2``, and ``||S_r||_F^2 = sum_{i, j <= r} s_qi^2 s_kj^2 (v_qi . v_kj)^2``:
  one ``d x d`` product per block gives every rank at once. The error shrinks as ``r`` grows, so
  this mask is monotone: if ``r`` is allowed, so is every larger rank.
* ``eq9`` guardrail (:func:`transition_energies`): the change of the transition
  ``r_{t-1} -> r'``: the Frobenius form of the Eq. 9 bound in ``separate`` mode, the exact
  Eq. 4 transition norm in ``joint`` mode. This is the paper's guardrail; it also masks moves up.

Both are on the unmasked ``m x n`` logits (a causal mask only removes entries). Blocks are
aggregated as stacked matrices: ``sqrt(sum_b num_b^2) / sqrt(sum_b ||S_b||_F^2)``; with per-head
ranks the aggregation is per key/value group.

The budget (:class:`FlopsBudget`) is hard and the guardrail yields to it: where no rank
satisfies both, only the largest rank the budget allows stays (:func:`combine_masks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch

from drrl_env.attention.bounds import logit_perturbation_bound, tail_energy_norm, transition_norm
from drrl_env.attention.hook import AttentionCall
from drrl_env.attention.lowrank import expand_kv_heads, logit_core


def guardrail_threshold(eps0: float, decay: float, step: int) -> float:
    """Annealed threshold (Eq. 11): ``eps_t = eps0 * exp(-decay * t)``, ``t`` the trainer's step count."""
    return eps0 * math.exp(-decay * step)


@dataclass(frozen=True)
class LogitErrors:
    """Squared logit errors of every candidate rank, per key/value group.

    Attributes:
        change: ``(K, Hkv)``: ``sum_b num_b^2`` over the blocks of each group, per candidate.
        total: ``(Hkv,)``: ``sum_b ||S_b||_F^2`` over the blocks of each group.
    """

    change: torch.Tensor
    total: torch.Tensor

    def relative(self, per_group: bool) -> torch.Tensor:
        """Relative error per candidate: ``(K, Hkv)`` per group, or ``(K,)`` over all groups."""
        tiny = torch.finfo(self.total.dtype).tiny
        if per_group:
            return (self.change / self.total.clamp_min(tiny)).sqrt()
        return (self.change.sum(-1) / self.total.sum().clamp_min(tiny)).sqrt()

    def relative_of(self, choice: torch.Tensor) -> float:
        """Relative error of one chosen candidate index per group, ``choice (Hkv,)``, all groups together."""
        picked = self.change.gather(0, choice.view(1, -1).to(self.change.device)).sum()
        return float((picked / self.total.sum().clamp_min(torch.finfo(self.total.dtype).tiny)).sqrt())


def _per_group(change: torch.Tensor, logit_energy: torch.Tensor, hkv: int, scale: float) -> LogitErrors:
    """Sum ``change (K, B, Hq)`` (unscaled norms) and ``logit_energy (B, Hq)`` (unscaled squares) per group."""
    groups = change.shape[-1] // hkv
    change_energy = change.square().view(change.shape[0], -1, hkv, groups).sum(dim=(1, 3)) * scale**2  # (K, Hkv)
    total_energy = logit_energy.reshape(-1, hkv, groups).sum(dim=(0, 2)) * scale**2  # (Hkv,)
    return LogitErrors(change=change_energy, total=total_energy)


def calibrated_logit_maps(call: AttentionCall, ranks: torch.Tensor) -> torch.Tensor:
    """``M = W_q W_k^T`` of the layer's calibrated bases at each row of ``ranks (K, Hkv)``: ``(K, Hkv, d, d)`` float64.

    The calibrated logits of a query ``q`` and key ``k`` of group ``h`` are ``q M_h k^T``; rank ``d`` in
    every head is full attention (``M = I``).
    """
    d = call.query.shape[-1]
    maps = []
    for row in ranks:
        if bool((row == d).all()):
            maps.append(torch.eye(d, dtype=torch.float64).expand(len(row), d, d))
            continue
        basis = call.calibrated_basis(row)
        maps.append((basis.query_map @ basis.key_map.transpose(-1, -2))[0])
    return torch.stack(maps).to(call.query.device)


def calibrated_logit_change(call: AttentionCall, difference: torch.Tensor) -> torch.Tensor:
    """``||Q_h A_g K^T||_F`` per candidate and query head, ``(K, B, Hq)``, for ``difference`` ``A (K, Hkv, d, d)``.

    Exact, from the blocks' Grams: ``||Q A K^T||_F^2 = tr(A^T Q^T Q A K^T K)``. Unscaled; float64.
    """
    groups = call.query.shape[1] // call.key.shape[1]
    gram_q = call.query_spectrum.gram()  # (B, Hq, d, d)
    gram_k = expand_kv_heads(call.key_spectrum.gram(), groups)  # (B, Hq, d, d)
    per_head = expand_kv_heads(difference, groups).unsqueeze(1)  # (K, 1, Hq, d, d)
    inner = per_head.transpose(-1, -2) @ gram_q @ per_head  # (K, B, Hq, d, d)
    return (inner * gram_k).sum(dim=(-1, -2)).clamp_min(0.0).sqrt()


def transition_energies(
    call: AttentionCall, rank_from: torch.Tensor, candidates: torch.Tensor, mode: str
) -> LogitErrors:
    """Logit change of moving from ``rank_from (Hkv,)`` to each candidate rank ``(K,)`` (Eq. 9 / Eq. 4)."""
    q_sigma, k_sigma = call.query_spectrum.singular_values, call.key_spectrum.singular_values  # (B,Hq,d),(B,Hkv,d)
    hq, hkv = q_sigma.shape[1], k_sigma.shape[1]
    device = q_sigma.device
    frm = expand_kv_heads(rank_from.view(1, hkv).to(device), hq // hkv)  # (1, Hq)
    to = expand_kv_heads(candidates.view(-1, 1).expand(-1, hkv).to(device), hq // hkv)  # (K, Hq)
    if mode == "separate":
        change = logit_perturbation_bound(q_sigma, k_sigma, frm[:, None, :], to[:, None, :], 1.0, "fro")
        logit_energy = logit_core(call.query_spectrum, call.key_spectrum).square().sum(dim=(-1, -2))  # (B, Hq)
    elif mode == "joint":
        _, core_s, _ = call.logit_core  # (B, Hq, d)
        change = transition_norm(core_s, frm[:, None, :], to[:, None, :])
        logit_energy = core_s.square().sum(-1)  # (B, Hq)
    elif mode == "calibrated":
        targets = candidates.view(-1, 1).expand(-1, hkv)
        before = calibrated_logit_maps(call, rank_from.view(1, hkv))
        change = calibrated_logit_change(call, before - calibrated_logit_maps(call, targets))
        logit_energy = logit_core(call.query_spectrum, call.key_spectrum).square().sum(dim=(-1, -2))
    else:
        raise ValueError(f"spectral mode must be 'separate', 'joint' or 'calibrated', got {mode!r}")
    return _per_group(change, logit_energy, hkv, call.scale)  # change: (K, B, Hq)


def separate_truncation_error(call: AttentionCall, candidates: torch.Tensor) -> torch.Tensor:
    """``||Q K^T - Q_r K_r^T||_F`` per candidate and block, ``(K, B, Hq)``, from the spectra. Unscaled; float64.

    ``Q_r K_r^T = Q P_q P_q^T P_k P_k^T K^T``, so the error is ``||Q B K^T||_F`` with
    ``B = I - P_q P_q^T P_k P_k^T``, and ``||Q B K^T||_F^2 = tr(B^T G_q B G_k) = ||S||_F^2 - ||S_r||_F^2``
    (see the module docstring), with ``||S_r||_F^2 = sum_{i, j <= r} W_ij``,
    ``W_ij = s_qi^2 s_kj^2 (v_qi . v_kj)^2``: a two-dimensional cumulative sum of ``W`` read at ``(r, r)``.
    """
    q_spec, k_spec = call.query_spectrum, call.key_spectrum
    groups = q_spec.singular_values.shape[1] // k_spec.singular_values.shape[1]
    v_k = expand_kv_heads(k_spec.right_vectors, groups)  # (B, Hq, d, d)
    overlap = (q_spec.right_vectors.transpose(-1, -2) @ v_k).square()  # (v_qi . v_kj)^2, (B, Hq, d, d)
    weights = q_spec.energies.unsqueeze(-1) * expand_kv_heads(k_spec.energies, groups).unsqueeze(-2) * overlap
    kept = weights.cumsum(-1).cumsum(-2)  # kept[..., r-1, r-1] = ||S_r||_F^2
    total = kept[..., -1, -1]  # ||S||_F^2, (B, Hq)
    index = (candidates.to(kept.device) - 1).tolist()
    kept_at_rank = kept[..., index, index].movedim(-1, 0)  # (K, B, Hq)
    return (total.unsqueeze(0) - kept_at_rank).clamp_min(0.0).sqrt()


def truncation_errors(call: AttentionCall, candidates: torch.Tensor, mode: str) -> LogitErrors:
    """Logit error of each candidate rank ``(K,)`` against full attention (the ``exact`` guardrail)."""
    if mode == "separate":
        change = separate_truncation_error(call, candidates)
        logit_energy = logit_core(call.query_spectrum, call.key_spectrum).square().sum(dim=(-1, -2))  # (B, Hq)
    elif mode == "joint":
        _, core_s, _ = call.logit_core  # (B, Hq, d)
        change = tail_energy_norm(core_s, candidates.view(-1, 1, 1).to(core_s.device))  # (K, B, Hq)
        logit_energy = core_s.square().sum(-1)
    elif mode == "calibrated":
        d = call.query.shape[-1]
        maps = calibrated_logit_maps(call, candidates.view(-1, 1).expand(-1, call.key.shape[1]))
        change = calibrated_logit_change(call, torch.eye(d, dtype=maps.dtype, device=maps.device) - maps)
        logit_energy = logit_core(call.query_spectrum, call.key_spectrum).square().sum(dim=(-1, -2))
    else:
        raise ValueError(f"spectral mode must be 'separate', 'joint' or 'calibrated', got {mode!r}")
    return _per_group(change, logit_energy, call.key_spectrum.singular_values.shape[1], call.scale)


def guardrail_mask(errors: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Boolean mask, ``(K,)`` or ``(K, Hkv)``: True where the relative error is within ``epsilon``.

    The largest candidate rank always stays allowed, so the mask is never all False.
    """
    allowed = errors <= epsilon
    allowed[-1] = True
    return allowed


@dataclass
class FlopsBudget:
    """An episode's budget on logit FLOPs (the ``Q K^T`` product), enforced AMC-style through the mask.

    Costs are counted exactly in integer *units*: attended (query, key) pairs times the ranks
    summed over query heads (one unit is ``2 B`` FLOPs, see ``drrl_env.attention.flops``). Full attention
    costs ``sum_t pairs_t * Hq * d`` units. A candidate is allowed only if the episode can still
    end within ``share`` of that with every remaining step at the smallest rank, so every
    episode ends at or under budget, whatever the policy does.

    Attributes:
        step_pairs: attended pairs of each step of the episode, in step order.
        share: the budget, a share of full attention's logit FLOPs, in ``[r_min / d, 1]``.
        ranks: the sorted candidate ranks.
        kv_heads, groups, head_dim: the model's key/value heads, query heads per group, ``d``.
        per_head: one rank per key/value group (the mask of a group assumes the others at the
            smallest rank) instead of one rank for all.
        spent: units spent by the steps taken so far.
    """

    step_pairs: tuple[int, ...]
    share: float
    ranks: tuple[int, ...]
    kv_heads: int
    groups: int
    head_dim: int
    per_head: bool = False
    spent: int = 0
    _allowance: Fraction = field(init=False, repr=False)

    def __post_init__(self) -> None:
        smallest = Fraction(min(self.ranks), self.head_dim)
        if Fraction(self.share) < smallest:
            raise ValueError(
                f"flops_budget {self.share} is below the smallest candidate's share {min(self.ranks)}/{self.head_dim} "
                f"= {float(smallest):.4f}: no episode could meet it"
            )
        self._allowance = Fraction(self.share) * self.full_units

    @property
    def full_units(self) -> int:
        return self._full_units_from(0)

    def _full_units_from(self, step: int) -> int:
        """Units of full attention over the steps from ``step`` on."""
        return sum(self.step_pairs[step:]) * self.kv_heads * self.groups * self.head_dim

    def cost(self, step: int, ranks: torch.Tensor | np.ndarray) -> int:
        """Units of step ``step`` with ``ranks (Hkv,)``."""
        return self.step_pairs[step] * self.groups * int(np.asarray(ranks).sum())

    def left_share(self, step: int) -> float:
        """Budget left over the full cost of the steps from ``step`` on: the mean rank share the rest may use."""
        rest = self._full_units_from(step)
        return float((self._allowance - self.spent) / rest) if rest else 0.0

    def _within(self, step: int, rank_sum: int) -> bool:
        """Whether the episode ends within budget with ``rank_sum`` (over the groups) at ``step``.

        Every later step is taken at the smallest rank.
        """
        later = sum(self.step_pairs[step + 1 :]) * self.kv_heads * self.groups * min(self.ranks)
        return self.spent + self.step_pairs[step] * self.groups * rank_sum + later <= self._allowance

    def mask(self, step: int) -> torch.Tensor:
        """``(K, Hkv)``: True where a group's candidate keeps the episode within budget.

        With per-head ranks the other groups are taken at the smallest rank; without, every group
        takes the candidate.
        """
        others = min(self.ranks) if self.per_head else None  # the rank of the other groups (None: the candidate)
        fits = [self._within(step, rank + (self.kv_heads - 1) * (others or rank)) for rank in self.ranks]
        return torch.tensor(fits).unsqueeze(1).expand(-1, self.kv_heads).clone()

    def fits(self, step: int, ranks: torch.Tensor) -> bool:
        """Whether ``ranks (Hkv,)`` at ``step`` keeps the episode within budget (later steps at the smallest rank)."""
        return self._within(step, int(np.asarray(ranks).sum()))

    def uniform_rank(self) -> int:
        """The largest candidate rank that every step can take within the budget (share ``min(r, d) / d <= share``)."""
        budget = Fraction(self.share)
        return max(rank for rank in self.ranks if Fraction(min(rank, self.head_dim), self.head_dim) <= budget)

    @property
    def used_share(self) -> float:
        """Units spent so far over the episode's full-attention units."""
        return self.spent / self.full_units


def combine_masks(guard: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Guardrail and budget masks ``(K, Hkv)`` together; where none is left, the largest rank the budget allows."""
    both = guard & budget
    for group in torch.nonzero(~both.any(dim=0)).flatten().tolist():
        both[int(torch.nonzero(budget[:, group]).max()), group] = True
    return both


def nearest_allowed(target_rank: float, action_mask: np.ndarray, ranks: np.ndarray | tuple) -> int:
    """Index of the allowed candidate nearest to ``target_rank`` (ties: the larger).

    The one rule by which the env executes a masked action and by which baselines pick a rank.
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    allowed = np.flatnonzero(np.asarray(action_mask, dtype=bool))
    if not len(allowed):
        raise ValueError("action_mask allows no candidate")
    distance = np.abs(ranks[allowed] - target_rank)
    best = np.flatnonzero(distance == distance.min())
    return int(allowed[best[-1]])  # ranks are sorted: the last of the tied is the larger


def nearest_allowed_per_group(
    target_ranks: np.ndarray | list[float], action_mask: np.ndarray, ranks: np.ndarray | tuple
) -> np.ndarray:
    """``(Hkv,)`` indices: :func:`nearest_allowed` per key/value group, in its part of the mask.

    ``target_ranks``: one rank per group, or one for all; ``action_mask``: group-major ``(Hkv * K,)``
    (a per-head env's ``action_masks()``).
    """
    group_masks = np.asarray(action_mask, dtype=bool).reshape(-1, len(ranks))
    targets = np.broadcast_to(np.asarray(target_ranks, dtype=np.float64), (len(group_masks),))
    return np.array(
        [nearest_allowed(target, mask, ranks) for target, mask in zip(targets, group_masks, strict=True)],
        dtype=np.int64,
    )
