"""The perturbation guardrail (Eqs. 9, 11): per-candidate transition perturbations and masks.

The perturbation of a transition ``r_{t-1} -> r'`` is measured on the current layer's (and
segment's) logits ``S = Q K^T * scale`` and reported *relative* to ``||S||_F``, so one threshold
means the same at every layer, model and sequence length. Per block (batch element x query head)
the numerator is:

* ``separate`` mode: the Frobenius form of the Eq. 9 bound (an upper bound on ``||dS||_F``);
* ``joint`` mode: the exact ``||dS||_F``, the Eq. 4 transition norm of the logit spectrum.

Blocks are aggregated as stacked matrices: ``sqrt(sum_b num_b^2) / sqrt(sum_b ||S_b||_F^2)``,
which (Frobenius norms add in squares) bounds, or in ``joint`` mode equals, the relative change of
all the step's logits taken together. With per-head ranks the aggregation is per key/value group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from drrl_env.bounds import logit_perturbation_bound, transition_norm
from drrl_env.hook import AttentionCall
from drrl_env.lowrank import expand_kv_heads, logit_core


def guardrail_threshold(eps0: float, decay: float, step: int) -> float:
    """Annealed threshold (Eq. 11): ``eps_t = eps0 * exp(-decay * t)``, ``t`` counted in env steps."""
    return eps0 * math.exp(-decay * step)


@dataclass(frozen=True)
class TransitionEnergies:
    """Squared logit changes of every candidate transition, per key/value group.

    Attributes:
        change: ``(K, Hkv)``: ``sum_b num_b^2`` over the blocks of each group, per candidate.
        total: ``(Hkv,)``: ``sum_b ||S_b||_F^2`` over the blocks of each group.
    """

    change: torch.Tensor
    total: torch.Tensor

    def relative(self, per_group: bool) -> torch.Tensor:
        """Relative perturbation per candidate: ``(K, Hkv)`` per group, or ``(K,)`` over all groups."""
        tiny = torch.finfo(self.total.dtype).tiny
        if per_group:
            return (self.change / self.total.clamp_min(tiny)).sqrt()
        return (self.change.sum(-1) / self.total.sum().clamp_min(tiny)).sqrt()

    def relative_of(self, choice: torch.Tensor) -> float:
        """Relative perturbation of one chosen candidate index per group, ``choice (Hkv,)``, all groups together."""
        picked = self.change.gather(0, choice.view(1, -1).to(self.change.device)).sum()
        return float((picked / self.total.sum().clamp_min(torch.finfo(self.total.dtype).tiny)).sqrt())


def transition_energies(
    call: AttentionCall, rank_from: torch.Tensor, candidates: torch.Tensor, mode: str
) -> TransitionEnergies:
    """Logit perturbation energies of moving from ``rank_from`` to each candidate rank.

    Args:
        call: the step's attention call (its cached spectra are reused).
        rank_from: ``(Hkv,)`` ranks of the previous step.
        candidates: ``(K,)`` candidate ranks.
        mode: ``"separate"`` (Eq. 9 bound) or ``"joint"`` (exact).
    """
    q_sigma, k_sigma = call.query_spectrum.singular_values, call.key_spectrum.singular_values  # (B,Hq,d),(B,Hkv,d)
    hq, hkv = q_sigma.shape[1], k_sigma.shape[1]
    groups = hq // hkv
    device = q_sigma.device
    frm = expand_kv_heads(rank_from.view(1, hkv).to(device), groups)  # (1, Hq)
    to = expand_kv_heads(candidates.view(-1, 1).expand(-1, hkv).to(device), groups)  # (K, Hq)
    if mode == "separate":
        change = logit_perturbation_bound(q_sigma, k_sigma, frm[:, None, :], to[:, None, :], call.scale, "fro")
        logit_energy = logit_core(call.query_spectrum, call.key_spectrum).square().sum(dim=(-1, -2))  # (B, Hq)
    elif mode == "joint":
        _, core_s, _ = call.logit_core  # (B, Hq, d)
        change = transition_norm(core_s, frm[:, None, :], to[:, None, :]) * call.scale
        logit_energy = core_s.square().sum(-1)  # (B, Hq)
    else:
        raise ValueError(f"spectral mode must be 'separate' or 'joint', got {mode!r}")
    # change: (K, B, Hq); ||S||_F^2 of the unscaled logits per block, from the d x d core
    logit_energy = logit_energy * call.scale**2
    change_energy = change.square().view(change.shape[0], -1, hkv, groups).sum(dim=(1, 3))  # (K, Hkv)
    total_energy = logit_energy.view(-1, hkv, groups).sum(dim=(0, 2))  # (Hkv,)
    return TransitionEnergies(change=change_energy, total=total_energy)


def guardrail_mask(perturbations: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Boolean mask, ``(K,)`` or ``(K, Hkv)``: True where the perturbation is within ``epsilon``.

    The largest candidate rank always stays allowed, so the mask is never all False.
    """
    allowed = perturbations <= epsilon
    allowed[-1] = True
    return allowed
