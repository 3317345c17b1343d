"""The env's action: validation of an index (or one index per key/value group) into the candidate ranks."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def action_indices(action: Any, num_candidates: int, kv_heads: int, per_head: bool) -> torch.Tensor:
    """Validate an env action; return its candidate indices per key/value group, ``(Hkv,)``.

    ``per_head``: one index per key/value group, shape ``(kv_heads,)``; else one index (a scalar or shape
    ``(1,)``), played in every group. Integral floats are accepted; NaN, fractions, other types, wrong
    shapes and indices outside ``[0, num_candidates)`` raise ``ValueError`` naming what was expected.
    """
    expected = f"shape ({kv_heads},)" if per_head else "a scalar (or shape (1,))"
    try:
        array = np.asarray(action)
    except (TypeError, ValueError) as error:
        raise ValueError(f"action must be integer index(es) into ranks, {expected}; got {action!r}") from error
    if array.dtype == object:  # e.g. a list mixing types: accept only if every entry is an integral number
        entries = array.ravel().tolist()
        if not all(isinstance(e, (int, float, np.integer, np.floating)) and not isinstance(e, bool) for e in entries):
            raise ValueError(f"action must be integer index(es) into ranks, {expected}; got {action!r}")
        array = array.astype(np.float64)
    if array.dtype.kind not in "iuf":
        raise ValueError(f"action must be integer index(es) into ranks, {expected}; got {action!r}")
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise ValueError(f"action must be integer index(es) into ranks, got {action!r} (NaN or fractional)")
        if np.abs(array).max(initial=0) >= 2**62:
            raise ValueError(f"action index(es) must lie in [0, {num_candidates - 1}], got {action!r}")
        array = array.astype(np.int64)
    if array.dtype.kind == "u" and array.max(initial=0) >= 2**63:
        raise ValueError(f"action index(es) must lie in [0, {num_candidates - 1}], got {action!r}")
    if per_head:
        if array.shape != (kv_heads,):
            raise ValueError(f"action must have {expected} (one index per key/value head), got shape {array.shape}")
    elif array.size != 1:
        raise ValueError(f"action must be {expected}, got shape {array.shape}")
    indices = array.reshape(-1).astype(np.int64)
    if indices.min() < 0 or indices.max() >= num_candidates:
        raise ValueError(f"action index(es) must lie in [0, {num_candidates - 1}], got {array.tolist()}")
    if not per_head:
        indices = np.repeat(indices, kv_heads)
    return torch.as_tensor(indices)
