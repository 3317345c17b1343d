"""oracle: the greedy oracle of DR-RL and trajectory datasets of any rank policy (HF ``datasets``).

Uses only the public API of ``drrl_env``.
"""

from oracle.dataset import (
    DatasetCorruptError,
    DatasetMismatchError,
    load_trajectories,
    read_metadata,
    record_trajectories,
)
from oracle.policy import GreedyOracle, RankPolicy

__all__ = [
    "DatasetCorruptError",
    "DatasetMismatchError",
    "GreedyOracle",
    "RankPolicy",
    "load_trajectories",
    "read_metadata",
    "record_trajectories",
]
