"""The RLlib backend's metrics: ``drrl/`` scalars logged in the env runners, written to TensorBoard by the driver.

:class:`DRRLMetricsCallback` runs in every env runner: each env step's ``info`` becomes the same
``drrl/…`` scalars the SB3 backend logs (:func:`agents.training.step_metrics`), plus the mean
rank per (layer, segment) and a count per rank for the heatmap and the histogram. RLlib reduces
them over each training iteration and across runners (means of the runners' means).
:class:`TensorBoardResults` writes an iteration's results under SB3's names (``rollout/``,
``train/``, ``time/``, ``drrl/``, ``eval/``), so runs of both backends sit side by side in one
TensorBoard. Importing this module needs Ray.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray.rllib.callbacks.callbacks import RLlibCallback
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

from agents.training import rank_heatmap, step_metrics

RANK_CELLS = "drrl_rank_cells"
"""results key of the mean rank per ``"layer:segment"``"""
RANK_COUNTS = "drrl_rank_counts"
"""results key of the number of steps per (mean over heads) rank"""


class DRRLMetricsCallback(RLlibCallback):
    """Logs every env step's ``drrl/`` scalars, its rank cell and its rank count to the env runner's metrics."""

    def on_episode_step(self, *, episode: Any, metrics_logger: Any = None, **kwargs: Any) -> None:
        info = episode.get_infos(-1)
        for name, value in step_metrics(info).items():
            metrics_logger.log_value(("drrl", name), value, reduce="mean")
        if "rank" in info:
            rank = float(np.mean(info["rank"]))
            metrics_logger.log_value((RANK_CELLS, f"{info['layer']}:{info.get('segment', 0)}"), rank, reduce="mean")
            metrics_logger.log_value((RANK_COUNTS, f"{rank:g}"), 1, reduce="sum")


def _scalars(tree: dict[str, Any], prefix: str) -> dict[str, float]:
    """The finite numbers of a nested results dict, as ``prefix + "a/b"`` keys."""
    found: dict[str, float] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            found.update(_scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value):
            found[f"{prefix}{key}"] = float(value)
    return found


class TensorBoardResults:
    """Writes RLlib's iteration results to TensorBoard in ``run_dir``, at the env steps sampled so far."""

    def __init__(self, run_dir: Path) -> None:
        self.writer = SummaryWriter(str(run_dir))

    def hyperparameters(self, values: dict[str, Any]) -> None:
        """The run's options, as the SB3 backend records them (TensorBoard's HPARAMS tab)."""
        plain = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in values.items()}
        for summary in hparams_summary(plain, {"rollout/ep_rew_mean": 0.0, "eval/ppl": 0.0}):
            self.writer.file_writer.add_summary(summary)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def iteration(self, results: dict[str, Any], step: int, seconds: float, steps_this_iteration: int) -> None:
        """One ``algo.train()`` result: episode returns, learner statistics, ``drrl/`` metrics, ranks."""
        runners = results.get("env_runners", {})
        values = {
            "rollout/ep_rew_mean": runners.get("episode_return_mean", math.nan),
            "rollout/ep_len_mean": runners.get("episode_len_mean", math.nan),
            "time/fps": steps_this_iteration / seconds if seconds > 0 else math.nan,
        }
        values.update(_scalars(results.get("learners", {}).get("default_policy", {}), "train/"))
        values.update(_scalars(runners.get("drrl", {}), "drrl/"))
        self.scalars({k: v for k, v in values.items() if math.isfinite(v)}, step)
        cells = {
            (int(layer), int(segment)): value
            for key, value in _scalars(runners.get(RANK_CELLS, {}), "").items()
            for layer, segment in [key.split(":")]
        }
        if cells:
            self.writer.add_image("drrl/rank_heatmap", rank_heatmap(cells), step, dataformats="HWC")
        counts = _scalars(runners.get(RANK_COUNTS, {}), "")
        if counts:
            ranks = np.repeat([float(rank) for rank in counts], [int(count) for count in counts.values()])
            self.writer.add_histogram("drrl/rank_histogram", torch.tensor(ranks), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
