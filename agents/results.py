"""Evaluation results: the row of one policy on one corpus and mode, the markdown table, the CSV, the verdicts.

Shared by the evaluation (:mod:`agents.evaluate`), which makes rows, and the figures
(:mod:`agents.figures`), which draw them, so neither imports the other.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drrl_env.lm.files import write_atomic


@dataclass
class EvaluationRow:
    """One policy on one corpus in one spectral mode (means over the evaluated episodes)."""

    policy: str
    corpus: str
    mode: str
    episodes: int
    tokens: int
    nll: float
    nll_full: float
    flops_ratio: float
    flops_core_ratio: float
    flops_logits_ratio: float
    """the Q K^T product's FLOPs over full attention's (what a FLOPs budget constrains)"""
    kl: float
    """mean per-token KL of the next-token distribution from the full model's"""
    mean_rank: float
    violation_rate: float
    ms_per_token: float
    ms_per_token_full: float
    rank_per_layer: list[float]
    rank_grid: list[list[float]]
    flops_policy_ratio: float = 0.0
    """the policy network's own FLOPs (``ModelPolicy.flops_per_decision`` per step) over full attention's"""
    matched_to: str | None = None
    """for ``static:match``: the policy whose measured FLOPs set this row's budget"""
    budget: float | None = None
    """the episodes' logit-FLOPs budget, when the evaluation ran several (``--budgets``)"""
    episode_rank_per_layer: list[list[float]] = dataclasses.field(default_factory=list)
    """per episode, the mean rank of each layer: what the policy chose on each input (the contrasting-inputs figure)"""
    episode_kl: list[float] = dataclasses.field(default_factory=list)
    """per episode, the mean per-token KL from the full model"""
    decision_ms: float = math.nan
    """median wall-clock per episode of the policy's decisions: its ``reset`` and ``act`` calls, and the env's
    per-input signal where the policy reads it (``info["seconds_sensitivity"]``)"""
    headroom_captured: float = math.nan
    """(best fixed - this) / (best fixed - hindsight) of the KL, best fixed the lower of uniform and static at the
    same corpus, mode and budget (:func:`fill_headroom_captured`); NaN where those rows are missing"""

    @property
    def delta_ppl_percent(self) -> float:
        """PPL against the model's own on the same batches, in percent."""
        return 100.0 * (math.exp(self.nll - self.nll_full) - 1.0)

    @property
    def flops_with_policy_ratio(self) -> float:
        return self.flops_ratio + self.flops_policy_ratio

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    @property
    def ppl_full(self) -> float:
        return math.exp(self.nll_full)


TABLE_COLUMNS = (
    ("policy", "policy", "{}"),
    ("corpus", "corpus", "{}"),
    ("mode", "mode", "{}"),
    ("budget", "budget", "{:g}"),
    ("ppl", "PPL", "{:.2f}"),
    ("ppl_full", "PPL full (no hook)", "{:.2f}"),
    ("delta_ppl_percent", "ΔPPL %", "{:+.2f}"),
    ("kl", "KL", "{:.4f}"),
    ("headroom_captured", "headroom captured", "{:.2f}"),
    ("flops_logits_ratio", "FLOPs (logits)", "{:.3f}"),
    ("flops_ratio", "FLOPs (+overhead)", "{:.3f}"),
    ("flops_core_ratio", "FLOPs (core)", "{:.3f}"),
    ("flops_with_policy_ratio", "FLOPs (+overhead +policy)", "{:.3f}"),
    ("ms_per_token", "ms/token", "{:.3f}"),
    ("ms_per_token_full", "ms/token full", "{:.3f}"),
    ("decision_ms", "decision ms/episode", "{:.1f}"),
    ("mean_rank", "mean rank", "{:.1f}"),
    ("violation_rate", "violations", "{:.3f}"),
)


SUMMARY_COLUMNS = (
    "policy", "budget", "kl", "headroom_captured", "delta_ppl_percent", "flops_logits_ratio", "flops_with_policy_ratio",
    "decision_ms", "violation_rate",
)  # fmt: skip
"""the columns a training command prints; every column is in the CSV"""
OPTIONAL_COLUMNS = ("budget", "headroom_captured")
"""columns shown only where some row has a value: several budgets; uniform or static and hindsight rows"""


def _shown(value: object) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def markdown_table(rows: list[EvaluationRow], summary: bool = False) -> str:
    """The Table I analogue as markdown (the optional columns where some row has a value; "-" where one has not).

    ``summary``: only :data:`SUMMARY_COLUMNS`.
    """
    columns = [
        (key, title, fmt)
        for key, title, fmt in TABLE_COLUMNS
        if (key not in OPTIONAL_COLUMNS or any(_shown(getattr(row, key)) for row in rows))
        and (not summary or key in SUMMARY_COLUMNS)
    ]
    header = "| " + " | ".join(title for _, title, _ in columns) + " |"
    lines = [header, "|" + "---|" * len(columns)]
    for row in rows:
        cells = [fmt.format(getattr(row, key)) if _shown(getattr(row, key)) else "-" for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


FIXED_RULES = ("uniform", "static")
"""the non-adaptive allocations every policy must beat (policy names start with these)"""
CEILING = "hindsight"
"""the per-input allocation that knows the input's own layer profile: the ceiling of adaptivity"""


def fill_headroom_captured(rows: list[EvaluationRow]) -> None:
    """Set each row's ``headroom_captured``: how much of the gap from the best fixed rule to hindsight it closes.

    Per corpus, mode, budget and guardrail setting: best fixed = the lowest KL of the uniform and
    static rows, ceiling = the hindsight row's KL; a row's value is (best fixed - KL) /
    (best fixed - ceiling): 1 matches hindsight, 0 the best fixed rule, below 0 is worse. Groups
    without both, or where hindsight is not better than the best fixed rule, keep NaN.
    """
    groups: dict[tuple, list[EvaluationRow]] = {}
    for row in rows:
        ablation = row.policy.endswith(" (no guardrail)")
        groups.setdefault((row.corpus, row.mode, row.budget, ablation), []).append(row)
    for group in groups.values():
        names = [row.policy.removesuffix(" (no guardrail)") for row in group]
        fixed = [row.kl for row, name in zip(group, names, strict=True) if name.startswith(FIXED_RULES)]
        ceiling = [row.kl for row, name in zip(group, names, strict=True) if name.startswith(CEILING)]
        if not fixed or not ceiling or min(ceiling) >= min(fixed):
            continue
        best, top = min(fixed), min(ceiling)
        for row in group:
            row.headroom_captured = (best - row.kl) / (best - top)


def adaptivity_verdicts(rows: list[EvaluationRow]) -> list[str]:
    """For each ``static:match`` row: does the agent beat the static allocation at equal FLOPs? One line each.

    The agent beats it when both its KL from the full model (the label-free objective) and its PPL (the
    paper's) are lower, does not when neither is, and the line says which one it wins when they disagree.
    Where the static row's measured FLOPs differ from the agent's by more than 1 % (the guardrail raised
    some of its ranks), the line says that there is no equal-FLOPs comparison.
    """
    lines = []
    for static in (row for row in rows if row.matched_to):
        agent = next(
            row
            for row in rows
            if row.policy == static.matched_to
            and (row.corpus, row.mode, row.budget) == (static.corpus, static.mode, static.budget)
        )
        setting = f"{static.corpus}/{static.mode}" + (" without guardrail" if "(no guardrail)" in static.policy else "")
        numbers = (
            f"agent KL {agent.kl:.4f}, PPL {agent.ppl:.2f} at logit FLOPs {agent.flops_logits_ratio:.3f}; "
            f"static KL {static.kl:.4f}, PPL {static.ppl:.2f} at {static.flops_logits_ratio:.3f}"
        )
        if abs(static.flops_logits_ratio - agent.flops_logits_ratio) > 0.01 * agent.flops_logits_ratio:
            lines.append(
                f"{setting}: no equal-FLOPs comparison: the static allocation ran at other "
                f"FLOPs than its budget (the guardrail moved its ranks) ({numbers})"
            )
            continue
        lower_kl, lower_ppl = agent.kl < static.kl, agent.ppl < static.ppl
        if lower_kl == lower_ppl:
            verdict = "beats" if lower_kl else "does NOT beat"
        else:  # the two measures disagree
            won, lost = ("KL", "PPL") if lower_kl else ("PPL", "KL")
            verdict = f"does NOT clearly beat (lower {won}, higher {lost})"
        lines.append(f"{setting}: the agent {verdict} the static per-layer allocation at its FLOPs ({numbers})")
    return lines


NOT_IN_CSV = ("rank_grid", "episode_rank_per_layer")
"""the row fields :func:`write_csv` leaves out (a grid per row and a list per episode); :func:`read_csv` gives them
back empty"""


def write_csv(rows: list[EvaluationRow], path: Path) -> None:
    """All fields of every row (per-layer ranks as a space-separated list)."""
    fields = [f.name for f in dataclasses.fields(EvaluationRow) if f.name not in NOT_IN_CSV]
    write_rows_csv(rows, [*fields, "ppl", "ppl_full", "delta_ppl_percent", "flops_with_policy_ratio"], path)


def write_rows_csv(rows: Sequence[Any], fields: Sequence[str], path: str | Path) -> None:
    """The attributes ``fields`` of every row as a CSV (a list as its items space-separated), written atomically."""

    def write(temporary: str) -> None:
        with open(temporary, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(fields)
            for row in rows:
                values = [getattr(row, name) for name in fields]
                writer.writerow([" ".join(map(str, v)) if isinstance(v, list) else v for v in values])

    write_atomic(Path(path), write)


def read_csv(path: Path) -> list[EvaluationRow]:
    """The rows of a :func:`write_csv` file, the :data:`NOT_IN_CSV` fields empty."""
    fields = {f.name: str(f.type) for f in dataclasses.fields(EvaluationRow) if f.name not in NOT_IN_CSV}
    rows = []
    with open(path, newline="") as handle:
        for record in csv.DictReader(handle):
            values = {}
            for name, kind in fields.items():  # the derived columns (ppl, ...) are not fields
                text = record.get(name)
                if text is None:
                    continue  # a column an older file lacks: the field's default
                if kind.startswith("list"):
                    values[name] = [float(v) for v in text.split()]
                elif text == "":
                    values[name] = None
                elif kind.startswith("int"):
                    values[name] = int(text)
                elif kind.startswith("float"):
                    values[name] = float(text)
                else:
                    values[name] = text
            rows.append(EvaluationRow(**values, **{name: [] for name in NOT_IN_CSV}))
    return rows
