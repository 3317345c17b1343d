"""What the evaluation and training write to TensorBoard beyond SB3's own scalars.

An evaluation is one folder under ``--logdir`` (``evaluate__TIME``) with one *run* per policy, so TensorBoard's
run selector overlays the policies on every chart. Every row of the evaluation is a scalar tagged
``eval/<metric>/<corpus>/<mode>/budget_<b>``: the corpus by its short name (a file's stem), the budget in the tag,
so two budgets never share a tag; and ``eval/<metric>/<corpus>/<mode>/by_budget`` with the budget (per mille) as
the step. A custom-scalars layout (TensorBoard's own plugin) draws the latter, every policy of a metric on one
chart per corpus and mode, a line across the budgets; the figures go in as images under the names of the PNGs. Training
runs get a layout of their ``drrl/`` scalars beside SB3's ``rollout/`` and ``train/``, and their
hyperparameters in the HParams tab.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from agents.results import EvaluationRow
from drrl_env.lm.corpora import BUILTIN_CORPORA

EVAL_METRICS = {
    "kl": "KL to the full model (nats/token)",
    "delta_ppl_percent": "ΔPPL %",
    "headroom_captured": "headroom captured",
    "flops_logits_ratio": "FLOPs of the logits / full",
    "flops_with_policy_ratio": "FLOPs with the policy's signal / full",
    "decision_ms": "decision ms per episode",
}
"""the metrics an evaluation writes, by row field, with the chart titles"""
TRAIN_CHARTS = {
    "drrl": ["drrl/kl", "drrl/budget_used", "drrl/budget_mask_rate", "drrl/guardrail_mask_rate",
             "drrl/violation_rate", "drrl/flops_saved"],
    "rollout": ["rollout/ep_rew_mean", "rollout/ep_len_mean"],
    "train": ["train/loss", "train/entropy_loss", "train/approx_kl", "train/explained_variance"],
}  # fmt: skip
"""the training layout: one category per prefix, one chart per scalar"""


def corpus_name(corpus: str) -> str:
    """A corpus's short name in tags: a built-in corpus's name, a local file's stem, a hub id's last part."""
    if corpus in BUILTIN_CORPORA:
        return corpus
    return Path(corpus).stem or Path(corpus).name or "corpus"


def run_name(policy: str) -> str:
    """A policy's name as a TensorBoard run (a folder): no path separators."""
    return re.sub(r"[/\\\s]+", "_", policy).strip("._") or "policy"


def eval_tag(metric: str, row: EvaluationRow, budget: float | None) -> str:
    """``eval/<metric>/<corpus>/<mode>/budget_<b>`` (``budget_none`` without a budget)."""
    if budget is None:
        shown = "none"
    elif isinstance(budget, (tuple, list)):  # a range drawn per episode
        shown = "-".join(f"{value:g}" for value in budget)
    else:
        shown = f"{budget:g}"
    return f"eval/{metric}/{corpus_name(row.corpus)}/{row.mode}/budget_{shown}"


def write_evaluation(rows: list[EvaluationRow], folder: Path, default_budget: float | None) -> None:
    """Write ``rows`` to ``folder`` (one run per policy) with the custom-scalars layout.

    ``default_budget``: the budget of rows that carry none (an evaluation at the env's one budget).
    """
    from torch.utils.tensorboard import SummaryWriter

    writers: dict[str, Any] = {}
    layout: dict[str, dict[str, list]] = {}

    def budget_of(row: EvaluationRow) -> float:
        budget = row.budget if row.budget is not None else default_budget
        return budget if isinstance(budget, (int, float)) else 0.0

    for row in sorted(rows, key=budget_of):  # steps in order: TensorBoard drops what a smaller step follows
        name = run_name(row.policy)
        writer = writers.setdefault(name, SummaryWriter(str(folder / name)))
        budget = row.budget if row.budget is not None else default_budget
        for metric, title in EVAL_METRICS.items():
            value = getattr(row, metric)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            writer.add_scalar(eval_tag(metric, row, budget), value, 0)
            base = f"eval/{metric}/{corpus_name(row.corpus)}/{row.mode}"
            if isinstance(budget, (int, float)):  # the budget as the step (per mille): a line across budgets
                writer.add_scalar(f"{base}/by_budget", value, round(1000 * budget))
            chart = f"{corpus_name(row.corpus)} / {row.mode} (x: logit-FLOPs budget, per mille)"
            layout.setdefault(title, {})[chart] = ["Multiline", [f"^{base}/by_budget$"]]
    with SummaryWriter(str(folder / "layout")) as writer:
        writer.add_custom_scalars(layout)
    for writer in writers.values():
        writer.close()


def sb3_writer(model: Any) -> Any:
    """The ``SummaryWriter`` of an SB3 model's TensorBoard logger (what its ``rollout/`` and ``train/`` go to)."""
    from stable_baselines3.common.logger import TensorBoardOutputFormat

    for output in model.logger.output_formats:
        if isinstance(output, TensorBoardOutputFormat):
            return output.writer
    raise ValueError("the model logs to no TensorBoard folder")


def write_training_layout(writer: Any) -> None:
    """The custom-scalars layout of a training run: its ``drrl/`` scalars beside SB3's ``rollout/`` and ``train/``."""
    layout = {prefix: {tag: ["Multiline", [f"^{tag}$"]] for tag in tags} for prefix, tags in TRAIN_CHARTS.items()}
    writer.add_custom_scalars(layout)


def write_hparams(writer: Any, hyperparameters: dict[str, Any], metrics: dict[str, float]) -> None:
    """The run's hyperparameters and final metrics in TensorBoard's HParams tab, in the run's own event file."""
    from torch.utils.tensorboard.summary import hparams

    shown = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
             for key, value in hyperparameters.items()}  # fmt: skip
    for summary in hparams(shown, metrics):
        writer.file_writer.add_summary(summary)
    for key, value in metrics.items():
        writer.add_scalar(key, value, 0)
    writer.flush()
