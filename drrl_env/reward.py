"""Reward of the rank-selection MDP (Eqs. 8, 13)."""

from __future__ import annotations

import torch


def attention_output_similarity(full: torch.Tensor, low_rank: torch.Tensor) -> torch.Tensor:
    """``sim`` of Eq. 8: mean cosine similarity of the per-token, per-head output vectors, in ``[-1, 1]``.

    ``full`` is ``(B, H, m, d)``; ``low_rank`` is ``(B, H, m, d)`` or ``(K, B, H, m, d)`` for ``K``
    candidates. The cosine is taken over ``d`` for every (batch, head, token) and averaged: the
    result is a 0-d tensor, or ``(K,)``. A zero vector counts as similarity 1 if both are zero.
    """
    full, low_rank = full.double(), low_rank.double()
    dot = (full * low_rank).sum(-1)
    norms = full.norm(dim=-1) * low_rank.norm(dim=-1)
    both_zero = (full.norm(dim=-1) == 0) & (low_rank.norm(dim=-1) == 0)
    cosine = torch.where(norms > 0, dot / norms.clamp_min(torch.finfo(norms.dtype).tiny), both_zero.double())
    return cosine.flatten(-3).mean(-1).cpu()  # mean over (B, H, m)


def rank_reward(
    fidelity: float, flops_ratio: float, perturbation: float, alpha: float, beta: float, gamma: float
) -> float:
    """Eq. 13: ``R_t = alpha * sim - beta * FLOPs(r_t) - gamma * ||dA||_F`` (Eq. 8 is ``gamma = 0``).

    ``flops_ratio`` is the step's attention FLOPs (overheads included) over full attention's;
    ``perturbation`` is the relative logit change of the transition (see ``guardrail``).
    """
    return alpha * fidelity - beta * flops_ratio - gamma * perturbation
