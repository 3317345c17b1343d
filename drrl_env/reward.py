"""Rewards of the rank-selection MDP: the paper's per-step reward (Eqs. 8, 13) and the end-to-end KL reward.

``reward="eq13"``: every step gets :func:`rank_reward` (written once, here), its terms reported
by :func:`eq13_terms`.

``reward="kl"``: the episode's return is ``-KL``, the mean per-token KL divergence of the
model's next-token distribution with the chosen ranks from the full model's on the episode's
batch (:func:`next_token_kl`; label-free). Each step also gets a potential-based shaping term
(Ng, Harada & Russell 1999) ``F_t = Phi(s_{t+1}) - Phi(s_t)`` with
``Phi(s_t) = -w * D_t`` and ``Phi`` of the terminal state 0, where ``D_t``
(:func:`residual_deviation`) is the relative deviation of the current step's attention input
(the residual stream after the layer's input norm, for the step's tokens) from that of a
full-rank reference pass over the same batch. ``D`` is 0 before the first step (nothing has
changed yet), so the shaping terms of an episode sum to exactly 0 and the return is ``-KL``
whatever ``w`` is: shaping cannot change which policy is optimal, it only tells each step how
much damage it did (the growth of ``D``) instead of waiting for the end.

Why this potential: it is what the next layers see, it is free (the reference pass that the
KL needs records it), and it tracks the KL far better than the sum of the steps' exact logit errors,
which ignores how errors compound (``python -m experiments.measure_reward_guardrail``; docs/benchmarks.md).
"""

from __future__ import annotations

import math

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
    return sum(eq13_terms(fidelity, flops_ratio, perturbation, alpha, beta, gamma).values())


def eq13_terms(
    fidelity: float, flops_ratio: float, perturbation: float, alpha: float, beta: float, gamma: float
) -> dict[str, float]:
    """The three terms of Eq. 13 as ``info["reward_terms"]`` reports them (they sum to :func:`rank_reward`)."""
    return {"fidelity": alpha * fidelity, "flops": -beta * flops_ratio, "perturbation": -gamma * perturbation}


def kl_terminal_reward(kl: float, kl_baseline: float | None, baseline: str) -> float:
    """The kl reward's terminal term from the episode's KL to the full model (and a fixed rule's on the same batch).

    ``"none"``: ``-KL``; ``"uniform"`` / ``"reference"`` / ``"waterfill"``: ``KL_baseline - KL`` (the plain
    difference, with ``KL_baseline`` the KL of uniform ranks at the episode's budget / of the env's
    ``reference_ranks`` / of the water-fill of the episode's sensitivity profile, on the same batch);
    ``"uniform_log_ratio"`` / ``"reference_log_ratio"`` / ``"waterfill_log_ratio"``: ``log(KL_baseline / KL)``, the
    relative improvement, free of the input's scale (uniform ranks' KL varies 3-4x between inputs; a
    difference keeps that spread, a ratio does not). KLs are floored at 1e-9 nats, so an exact episode
    gives a finite reward.
    """
    if baseline == "none":
        return -kl
    if kl_baseline is None:
        raise ValueError(f"kl baseline {baseline!r} needs the KL of its fixed rule on the episode's batch")
    if baseline in ("uniform", "reference", "waterfill"):
        return kl_baseline - kl
    if baseline in ("uniform_log_ratio", "reference_log_ratio", "waterfill_log_ratio"):
        return math.log(max(kl_baseline, 1e-9) / max(kl, 1e-9))
    raise ValueError(f"unknown kl baseline {baseline!r}")


def residual_deviation(hidden: torch.Tensor | None, reference: torch.Tensor | None) -> float:
    """``D = ||h - h_ref||_F / ||h_ref||_F`` of a step's attention inputs ``(B, m, hidden)``; 0 if unavailable."""
    if hidden is None or reference is None:
        return 0.0
    difference = (hidden.double() - reference.double()).norm()
    return float(difference / reference.double().norm().clamp_min(torch.finfo(torch.float64).tiny))
