"""The marginal water-fill: spend a budget of logit FLOPs over a per-input cost profile (docs/glossary.md)."""

from __future__ import annotations

import numpy as np


def rank_shares(ranks: tuple[int, ...] | list[int], head_dim: int) -> np.ndarray:
    """``(K,)`` logit-FLOPs share of a layer at each candidate rank: ``min(r, d) / d`` (the env's budget unit)."""
    return np.minimum(np.asarray(ranks, dtype=np.float64), head_dim) / head_dim


def allocate_ranks(cost: np.ndarray, flops: np.ndarray, budget: float, weights: np.ndarray | None = None) -> list[int]:
    """Greedy marginal allocation: candidate index per layer whose mean FLOPs share is ``<= budget``.

    Args:
        cost: ``(L, K)`` cost (KL, or loss increase) of each layer alone at each candidate rank (ascending ranks).
        flops: ``(K,)`` FLOPs share of a layer at each candidate rank (the same for every layer).
        budget: target mean FLOPs share over layers. If even the minimum ranks exceed it, all
            layers end at the minimum.
        weights: ``(L,)`` relative FLOPs of each row (units of unequal size, e.g. causal query
            segments; mean 1); None: equal. The mean share is then ``mean(weights * flops[chosen])``.

    Starting from the largest candidate everywhere, each move lowers one layer by one candidate,
    the one with the smallest ``cost increase / FLOPs saved``.
    """
    num_layers, num_candidates = cost.shape
    weights = np.ones(num_layers) if weights is None else np.asarray(weights, dtype=np.float64)
    if weights.shape != (num_layers,):
        raise ValueError(f"weights must have shape ({num_layers},), got {weights.shape}")
    chosen = [num_candidates - 1] * num_layers
    while np.mean(weights * flops[chosen]) > budget + 1e-12:
        best, best_price = None, np.inf
        for layer, index in enumerate(chosen):
            if index == 0:
                continue
            saved = weights[layer] * (flops[index] - flops[index - 1])
            price = (cost[layer, index - 1] - cost[layer, index]) / max(saved, 1e-12)
            if price < best_price:
                best, best_price = layer, price
        if best is None:
            break
        chosen[best] -= 1
    return chosen


def waterfill_indices(profile: np.ndarray, shares: np.ndarray, budget: float) -> list:
    """:func:`allocate_ranks` over every row of an ``(L, K)`` or ``(L, U, K)`` profile at ``budget``.

    Returns the candidate index per layer (an int each), or per layer a list of one index per unit (``U``
    key/value groups): the hindsight teacher's allocation of the profiled input.
    """
    chosen = allocate_ranks(profile.reshape(-1, profile.shape[-1]), shares, budget)
    return np.asarray(chosen).reshape(profile.shape[0], -1).tolist() if profile.ndim == 3 else chosen


def waterfill_plan(profile: np.ndarray, ranks: tuple[int, ...], head_dim: int, budget: float) -> list:
    """:func:`waterfill_indices` as ranks: a rank per layer, or per layer a list of one rank per key/value group."""
    chosen = waterfill_indices(profile, rank_shares(ranks, head_dim), budget)
    return np.asarray(ranks)[np.asarray(chosen, dtype=np.int64)].tolist()
