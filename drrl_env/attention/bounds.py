"""Spectral energies and perturbation bounds (Eqs. 3, 4, 5, 9, 10, 14).

Every function takes singular values ``sigma`` of shape ``(..., d)`` in descending order (from
``spectra.block_spectrum`` or ``lowrank.logit_core_svd``) and is vectorised over ranks: a rank
argument may be an int or an int64 tensor broadcastable against ``sigma[..., 0]``.

Which norm each bound really bounds is stated in its docstring and tested against float64
reference computations in ``tests/test_bounds.py``. Bounds on logits are on the unmasked
``n x n`` logit matrix; a Frobenius bound also bounds any masked subset of its entries (causal
masking only removes entries), a spectral-norm bound does not.
"""

from __future__ import annotations

import torch

Rank = int | torch.Tensor


def cumulative_energy(sigma: torch.Tensor) -> torch.Tensor:
    """``E[..., r] = sum_{i<=r} sigma_i^2`` for ``r = 0..d``, ``(..., d+1)``."""
    zero = torch.zeros_like(sigma[..., :1])
    return torch.cat([zero, sigma.square().cumsum(-1)], dim=-1)


def _at_rank(table: torch.Tensor, rank: Rank) -> torch.Tensor:
    """``table[..., rank]`` with ``rank`` broadcast against ``table[..., 0]``."""
    index = torch.as_tensor(rank, device=table.device, dtype=torch.int64)
    index = index.expand(torch.broadcast_shapes(index.shape, table.shape[:-1]))
    expanded = table.expand(*index.shape, table.shape[-1])
    return expanded.gather(-1, index.unsqueeze(-1)).squeeze(-1)


def tail_energy_norm(sigma: torch.Tensor, rank: Rank) -> torch.Tensor:
    """Eckart-Young truncation error (Eq. 3): ``||X - X_r||_F = sqrt(sum_{i>r} sigma_i^2)``."""
    energy = cumulative_energy(sigma)
    return _at_rank(energy[..., -1:] - energy, rank).clamp_min(0.0).sqrt()


def transition_norm(sigma: torch.Tensor, rank_from: Rank, rank_to: Rank) -> torch.Tensor:
    """Frobenius norm of a rank transition (Eq. 4): ``||X_r' - X_r||_F = sqrt(sum_{min<i<=max} sigma_i^2)``.

    Exact for nested truncations of one SVD, in either direction (``r' > r`` or ``r' < r``).
    """
    energy = cumulative_energy(sigma)
    return (_at_rank(energy, rank_to) - _at_rank(energy, rank_from)).abs().sqrt()


def transition_spectral_norm(sigma: torch.Tensor, rank_from: Rank, rank_to: Rank) -> torch.Tensor:
    """``||X_r' - X_r||_2 = sigma_{min(r,r')+1}`` when ``r != r'``, else 0 (used by Eqs. 5 and 9)."""
    padded = torch.cat([sigma, torch.zeros_like(sigma[..., :1])], dim=-1)  # sigma_{d+1} = 0
    lo = torch.minimum(torch.as_tensor(rank_from), torch.as_tensor(rank_to))
    hi = torch.maximum(torch.as_tensor(rank_from), torch.as_tensor(rank_to))
    value = _at_rank(padded, lo)  # 0-based index lo is sigma_{lo+1}
    return torch.where((hi > lo).to(sigma.device), value, torch.zeros_like(value))


def truncated_product_bound(sigma_a: torch.Tensor, rank: Rank, v_frobenius: torch.Tensor) -> torch.Tensor:
    """Output sensitivity (Eq. 5): ``||A_r' V - A_r V||_F <= ||A_r' - A_r||_2 ||V||_F = sigma_{r+1} ||V||_F``.

    For any ``r' > r``; ``sigma_a`` are the singular values of the matrix being truncated.
    """
    padded = torch.cat([sigma_a, torch.zeros_like(sigma_a[..., :1])], dim=-1)
    return _at_rank(padded, rank) * v_frobenius


def normalized_energy_ratio(sigma: torch.Tensor, rank: Rank | None = None) -> torch.Tensor:
    """NER (Eq. 14): ``sum_{i<=r} sigma_i^2 / sum_j sigma_j^2``; all ranks ``0..d`` when ``rank`` is None.

    An all-zero spectrum has NER 1 at every rank (nothing is lost by truncating it).
    """
    energy = cumulative_energy(sigma)
    total = energy[..., -1:]
    ratio = torch.where(total > 0, energy / total.clamp_min(torch.finfo(energy.dtype).tiny), torch.ones_like(energy))
    return ratio if rank is None else _at_rank(ratio, rank)


def logit_perturbation_bound(
    q_sigma: torch.Tensor,
    k_sigma: torch.Tensor,
    rank_from: Rank,
    rank_to: Rank,
    scale: float,
    norm: str = "fro",
) -> torch.Tensor:
    """Bound on the change of the scaled logits for a rank transition in ``separate`` mode (Eq. 9).

    ``||Q_r' K_r'^T - Q_r K_r^T|| * scale <= (||dQ|| ||K||_2 + ||Q||_2 ||dK||) * scale`` with
    ``dQ = Q_r' - Q_r``, ``dK = K_r' - K_r`` (write the difference as ``dQ K_r'^T + Q_r dK^T``).
    With ``norm="fro"`` the left side is the Frobenius norm and ``||dQ||``, ``||dK||`` are Frobenius
    (Eq. 4 transition energies); with ``norm="2"`` all are spectral norms (the bound as printed in
    the paper, which bounds the spectral norm, not the Frobenius norm, of the logit change). The
    error of the approximation itself is the transition to ``rank_to = d``.

    Args:
        q_sigma: ``(B, Hq, d)`` singular values of the query blocks.
        k_sigma: ``(B, Hkv, d)`` singular values of the key blocks; expanded to the query heads.
        rank_from: rank before the transition, per query head, broadcastable to ``(B, Hq)``.
        rank_to: rank after it, likewise (a leading candidate axis ``(K, 1, 1)`` evaluates many
            transitions at once).
        scale: the logit scale, ``1/sqrt(d)``.
        norm: ``"fro"`` or ``"2"``.
    """
    groups = q_sigma.shape[-2] // k_sigma.shape[-2]
    k_sigma = k_sigma.repeat_interleave(groups, dim=-2)
    if norm == "fro":
        dq, dk = transition_norm(q_sigma, rank_from, rank_to), transition_norm(k_sigma, rank_from, rank_to)
    elif norm == "2":
        dq = transition_spectral_norm(q_sigma, rank_from, rank_to)
        dk = transition_spectral_norm(k_sigma, rank_from, rank_to)
    else:
        raise ValueError(f"norm must be 'fro' or '2', got {norm!r}")
    return (dq * k_sigma[..., 0] + q_sigma[..., 0] * dk) * scale


def output_perturbation_bound(logit_change_fro: torch.Tensor, v_spectral_norm: torch.Tensor) -> torch.Tensor:
    """Bound on the change of the attention output from a change of logits (Eq. 10, corrected).

    ``||O' - O||_F = ||(P' - P) V||_F <= ||P' - P||_F ||V||_2 <= 1/2 ||S' - S||_F ||V||_2``, since
    row-wise softmax is 1/2-Lipschitz in the 2-norm (its Jacobian ``diag(p) - p p^T`` has largest
    eigenvalue ``<= 1/2``). The paper writes ``||dA||_2 ||V||_F``, which is also true for the
    probabilities ``A`` but needs ``||dA||_2`` of the post-softmax matrix, which no spectral
    quantity gives; this form uses the logit bound of Eq. 9 (or the exact Eq. 4 value in
    ``joint`` mode) directly.

    Args:
        logit_change_fro: Frobenius norm (or a bound on it) of the change of the scaled logits.
        v_spectral_norm: ``||V||_2`` of the value block used by the same head.
    """
    return 0.5 * logit_change_fro * v_spectral_norm
