"""Batched spectra of per-head Q/K blocks, and power iteration (Eq. 16).

Method (chosen by measurement, see ``benchmarks/attention.py``): for an ``n x d`` block ``X``
with ``d <= 128`` the right singular vectors and singular values come from the ``d x d`` Gram
matrix ``G = X^T X``. ``G`` is formed in the input dtype (one batched GEMM, ``2 n d^2`` FLOPs
per block) and diagonalised by ``torch.linalg.eigh`` in float64 (``d x d`` work, cheap). The
eigenvalues are the squared singular values, clamped at zero, so rank-deficient or all-zero
blocks give exact zeros and never NaN. Squared singular values (energies) carry an absolute
error of order ``eps * sigma_1^2``; that is the quantity every bound and NER uses.

Where the eigendecomposition runs (:func:`symmetric_eigh`): ``torch.linalg.eigh`` on CUDA hands a
batch of matrices larger than 32 x 32 to cuSOLVER one matrix per launch (PyTorch's
``linalg_eigh_cusolver``; pytorch/pytorch#175585), so on a GPU the batch of ``64 x 64`` Grams is copied
to the host, decomposed there by LAPACK in one call, and copied back (``host``). On the CPU the two
are the same call (``device``). ``DRRL_EIGH_SOLVER`` or :func:`set_eigh_solver` choose explicitly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, get_args

import torch

EIGH_DTYPE = torch.float64
EighSolver = Literal["auto", "device", "host"]
EIGH_SOLVERS: tuple[str, ...] = get_args(EighSolver)
_eigh_solver: str | None = None  # None: DRRL_EIGH_SOLVER, else auto


def set_eigh_solver(solver: str) -> None:
    """Choose where :func:`symmetric_eigh` runs from now on.

    ``auto`` (``device`` on the CPU, ``host`` on CUDA), ``device`` (``torch.linalg.eigh`` where the tensor
    lives), or ``host`` (LAPACK on the CPU, one copy each way). Like
    ``torch.backends.cuda.preferred_linalg_library``, it is a process-wide setting; the environment variable
    ``DRRL_EIGH_SOLVER`` gives its initial value.
    """
    global _eigh_solver
    if solver not in EIGH_SOLVERS:
        raise ValueError(f"eigh solver {solver!r}: expected one of {', '.join(EIGH_SOLVERS)}")
    _eigh_solver = solver


def eigh_solver_for(device: torch.device) -> str:
    """The solver :func:`symmetric_eigh` uses for a tensor on ``device`` under the current setting."""
    solver = _eigh_solver or os.environ.get("DRRL_EIGH_SOLVER") or "auto"
    if solver not in EIGH_SOLVERS:
        raise ValueError(f"DRRL_EIGH_SOLVER={solver!r}: expected one of {', '.join(EIGH_SOLVERS)}")
    if solver == "auto":
        return "host" if device.type == "cuda" else "device"
    return solver


def symmetric_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of symmetric ``(..., d, d)`` matrices in ``EIGH_DTYPE``, without a launch per matrix.

    Returns eigenvalues ascending ``(..., d)`` and eigenvectors ``(..., d, d)``, both in ``EIGH_DTYPE`` on
    ``matrix``'s device. The solver follows :func:`set_eigh_solver`.
    """
    matrix = matrix.to(EIGH_DTYPE)
    if matrix.device.type != "cpu" and eigh_solver_for(matrix.device) == "device":
        return torch.linalg.eigh(matrix)
    eigenvalues, eigenvectors = _lapack_eigh(matrix.cpu())
    return eigenvalues.to(matrix.device, non_blocking=True), eigenvectors.to(matrix.device, non_blocking=True)


def _lapack_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of CPU matrices on one intra-op thread.

    A batch of small matrices gains nothing from LAPACK's threads, and while another thread's OpenMP pool is
    alive (the env's paused forward pass, ``drrl_env.lm.runner``) the threaded call waits on its cores: twice the
    time (docs/benchmarks.md, "The spectra's threads").
    """
    threads = torch.get_num_threads()
    if threads == 1:
        return torch.linalg.eigh(matrix)
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(matrix)
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class BlockSpectrum:
    """Right singular structure of a batch of ``n x d`` blocks ``X``.

    Attributes:
        singular_values: ``(..., d)`` in descending order, ``>= 0``, in ``EIGH_DTYPE``.
        right_vectors: ``(..., d, d)``; column ``i`` is the right singular vector of
            ``singular_values[..., i]``, in ``EIGH_DTYPE``.
    """

    singular_values: torch.Tensor
    right_vectors: torch.Tensor

    @property
    def energies(self) -> torch.Tensor:
        """Squared singular values ``sigma_i^2``, ``(..., d)``, descending."""
        return self.singular_values.square()

    @property
    def spectral_norm(self) -> torch.Tensor:
        """``||X||_2 = sigma_1``, ``(...)``."""
        return self.singular_values[..., 0]

    def gram(self) -> torch.Tensor:
        """``X^T X = V diag(sigma^2) V^T``, ``(..., d, d)``, in ``EIGH_DTYPE``."""
        return (self.right_vectors * self.energies.unsqueeze(-2)) @ self.right_vectors.transpose(-1, -2)

    def root_factor(self) -> torch.Tensor:
        """``R = diag(sigma) V^T`` with ``R^T R = X^T X``: a square-root factor, ``(..., d, d)``."""
        return self.singular_values.unsqueeze(-1) * self.right_vectors.transpose(-1, -2)


def block_spectrum(x: torch.Tensor) -> BlockSpectrum:
    """Batched partial SVD (right side) of the blocks ``x``: ``(..., n, d) -> BlockSpectrum``.

    All ``d`` singular values and right singular vectors are returned at once, so the
    truncation at every candidate rank reads slices of one result. Only the right side is
    needed: the low-rank attention projects onto right singular subspaces (see ``lowrank``).

    Eq. 12 (the paper's incremental SVD update, ``U_{r'} = [U_r, u_{r+1}, ..., u_{r'}]`` when the
    rank grows) is this slicing: with one full eigendecomposition per block, the components of
    every rank, up or down, are already there, so no incremental update is computed. (Nor could
    one be reused across steps: each step is a new layer or segment with new Q and K.)
    """
    return gram_spectrum(x.transpose(-1, -2) @ x)  # Gram (..., d, d)


def gram_spectrum(gram: torch.Tensor) -> BlockSpectrum:
    """The :class:`BlockSpectrum` of blocks ``X`` given only their Gram matrices ``G = X^T X``, ``(..., d, d)``.

    A sum of Grams (``X`` stacked from several blocks: the query heads of one key/value group, or
    many calibration sequences) gives the spectrum of the stacked block.
    """
    eigenvalues, eigenvectors = symmetric_eigh(gram)  # ascending
    singular_values = eigenvalues.flip(-1).clamp_min(0.0).sqrt()  # (..., d) descending
    right_vectors = eigenvectors.flip(-1)  # (..., d, d), columns match singular_values
    return BlockSpectrum(singular_values=singular_values, right_vectors=right_vectors)


def power_iteration_spectral_norm(
    matrix: torch.Tensor, iterations: int = 3, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Spectral norm ``||M||_2`` of ``(..., a, b)`` matrices by power iteration (Eq. 16).

    ``v_{k+1} = M^T M v_k / ||M^T M v_k||_2``, started from a seeded Gaussian vector; the
    estimate after ``iterations`` steps is ``||M v_K||_2``. It is a lower bound of the true
    norm that converges from below (the paper uses K = 3); callers that need a guaranteed
    upper bound must not use it for that. Computed in float64.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    m = matrix.to(torch.float64)
    v = torch.randn((*m.shape[:-2], m.shape[-1], 1), dtype=torch.float64, generator=generator, device="cpu").to(
        m.device
    )
    v = v / v.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    for _ in range(iterations):
        w = m.transpose(-1, -2) @ (m @ v)
        v = w / w.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return (m @ v).norm(dim=-2).squeeze(-1)
