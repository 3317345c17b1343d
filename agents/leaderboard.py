"""``python -m agents.leaderboard``: one fixed evaluation protocol for rank policies, and the ranked table.

Usage::

    python -m agents.leaderboard uniform static:fisher hindsight:scaled_delta   # entries named by their spec
    python -m agents.leaderboard runs/RUN/model.safetensors --name per-head-bc-ppo --tasks per-head
    python -m agents.leaderboard --regenerate                                   # only leaderboard/README.md

The protocol (:data:`PROTOCOL`, in the manner of CompilerGym's leaderboard): three tasks. Two of the prefill's
attention, one rank per key/value head group (``DRRL-Attention-v0``) and one per layer
(``DRRL-Attention-PerLayer-v0``), both ``joint``, 1 x 128 tokens; in each, the test splits of wiki, news and
Shakespeare at logit-FLOPs budgets 0.75, 0.625 and 0.5, 4 episodes per cell seeded 10000-10003, the policy's ranks
really in place (:func:`agents.evaluate.evaluate_policy`). One of generation's key cache (``key-cache``,
``DRRL-KVCache-v0`` on its defaults): the first 4 test prompts of wiki, news and Shakespeare at key-cache budgets
0.75 and 0.6 (:func:`agents.kv_evaluate.kv_comparison`; its specs are ``oracle.kvcache``'s rules or agents trained
in that env; the specs of one command share each corpus's prompt states). Each entry gets a folder
``leaderboard/<name>/`` with ``results.csv`` (one row per task, corpus and budget) and a ``README.md`` (command,
date, machine); ``leaderboard/README.md`` is regenerated from all folders: per task, the entries ranked by the headroom
they capture between the best fixed rule (the lower KL of the ``uniform`` and ``static`` entries in a cell)
and the per-input ceiling (the lowest KL of the ``hindsight`` entries), summed over the cells.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import platform
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.evaluate import evaluate_policy
from agents.kv_evaluate import KVRow, check_kv_spec, kv_comparison, make_kv_policy
from agents.results import EvaluationRow
from agents.zoo import check_policy_spec, make_policy
from drrl_env.config import ENV_ID, PER_LAYER_ENV_ID, VARIANTS, EnvConfig
from drrl_env.kvcache import KVCACHE_ENV_ID, KVCacheConfig
from drrl_env.lm.files import check_output_folder, write_text_atomic


@dataclass(frozen=True)
class Protocol:
    """What every entry is run on: the same cells, seeds and episodes."""

    tasks: tuple[tuple[str, str], ...] = (("per-head", ENV_ID), ("per-layer", PER_LAYER_ENV_ID))
    """(task name, registered env id): the env's settings, test split"""
    corpora: tuple[str, ...] = ("wiki", "news", "shakespeare")
    budgets: tuple[float, ...] = (0.75, 0.625, 0.5)
    """logit-FLOPs budgets, shares of full attention's"""
    episodes: int = 4
    """episodes per cell, seeded seed, seed + 1, ..."""
    seed: int = 10_000
    overrides: dict[str, Any] = field(default_factory=dict)
    """env keywords over every task's (none in :data:`PROTOCOL`; the tests shrink the model)"""
    kv_task: str = "key-cache"
    """the task of DRRL-KVCache-v0"""
    kv_budgets: tuple[float, ...] = (0.75, 0.6)
    """its key-cache budgets, shares of the full key cache's bytes"""
    kv_prompts: int = 4
    """its test prompts per cell (the first of each corpus's test split)"""
    kv_overrides: dict[str, Any] = field(default_factory=dict)
    """its env keywords over DRRL-KVCache-v0's defaults (none in :data:`PROTOCOL`)"""

    @property
    def task_names(self) -> list[str]:
        return [task for task, _ in self.tasks] + [self.kv_task]

    def kv_kwargs(self, corpus: str) -> dict[str, Any]:
        """The ``gym.make`` keywords of the key-cache task on ``corpus`` (every KVCacheConfig field)."""
        return {**vars(KVCacheConfig(**{**self.kv_overrides, "corpus": corpus})), "split": "test"}

    def env_kwargs(self, env_id: str, corpus: str, budget: float) -> dict[str, Any]:
        """The ``gym.make`` keywords of one cell (every EnvConfig field)."""
        cell = {**VARIANTS[env_id], **self.overrides, "corpus": corpus, "flops_budget": budget, "split": "test"}
        EnvConfig(**cell)  # checks them
        return {**_defaults(), **cell}


def _defaults() -> dict[str, Any]:
    return {f.name: f.default for f in fields(EnvConfig)}


PROTOCOL = Protocol()
FIXED_RULES = ("uniform", "static")
"""entries whose best KL in a cell is the bar (names start with these)"""
CEILING = "hindsight"
"""entries whose best KL in a cell is the per-input ceiling"""
FIELDS = (
    "task", "corpus", "budget", "episodes", "kl", "delta_ppl_percent", "flops_logits_ratio", "flops_ratio",
    "flops_with_policy_ratio", "decision_ms", "mean_rank", "violation_rate", "ppl", "ppl_full", "cache_ratio",
    "decision_share",
)  # fmt: skip
"""the columns of an entry's results.csv (a column a task does not measure is NaN: ``cache_ratio``, the key cache
used over full, and ``decision_share``, the decision's FLOPs over generating 1024 tokens, are the key-cache task's)"""


def entry_name(spec: str) -> str:
    """A short folder name for a policy spec: ``static:fisher`` -> ``static-fisher``; a file -> its run folder."""
    path = Path(spec)
    if path.suffix in (".safetensors", ".zip"):
        spec = path.parent.name if path.stem == "model" else path.stem
    return re.sub(r"[^A-Za-z0-9._-]+", "-", spec).strip("-.") or "entry"


def run_entry(
    spec: str, protocol: Protocol = PROTOCOL, tasks: Sequence[str] | None = None, trust_pickle: bool = False
) -> list[dict[str, Any]]:
    """Every cell of ``protocol`` (of ``tasks`` only, if given) for the policy ``spec``: one record per cell.

    A trained agent runs only in the tasks whose spaces it was trained for: a task it does not fit
    raises ``ValueError`` here, before any cell is run, unless ``tasks`` leaves it out.
    """
    chosen = [(task, env_id) for task, env_id in protocol.tasks if tasks is None or task in tasks]
    cells = [(task, env_id, corpus, budget) for task, env_id in chosen for corpus in protocol.corpora
             for budget in protocol.budgets]  # fmt: skip
    records = []
    for index, (task, env_id, corpus, budget) in enumerate(cells):
        kwargs = protocol.env_kwargs(env_id, corpus, budget)
        try:
            policy = make_policy(spec, kwargs, trust_pickle)
        except ValueError as error:
            raise ValueError(f"{spec} does not run in task {task} ({env_id}): {error}; choose --tasks") from None
        print(f"[{index + 1}/{len(cells)}] {spec}: {task}, {corpus}, budget {budget:g}", flush=True)
        row = evaluate_policy(policy, kwargs, protocol.episodes, protocol.seed, timing_repeats=0, split="test")
        records.append(_record(row, task, budget))
    return records


def _record(row: EvaluationRow, task: str, budget: float) -> dict[str, Any]:
    values = {"task": task, "corpus": row.corpus, "budget": budget}
    for name in FIELDS[3:]:
        values[name] = getattr(row, name, math.nan)
    return values


def _kv_record(row: KVRow, task: str, corpus: str) -> dict[str, Any]:
    values = {name: math.nan for name in FIELDS}
    values.update(task=task, corpus=corpus, budget=row.budget, episodes=row.prompts, kl=row.kl,
                  decision_ms=row.decision_ms, mean_rank=row.mean_rank, cache_ratio=row.cache_used,
                  decision_share=row.decision_share_generation)  # fmt: skip
    return values


def run_kv_entries(specs: Sequence[str], protocol: Protocol = PROTOCOL) -> dict[str, list[dict[str, Any]]]:
    """The key-cache task's cells of every spec (each corpus's prompt states computed once for all): by spec."""
    records: dict[str, list[dict[str, Any]]] = {spec: [] for spec in specs}
    for index, corpus in enumerate(protocol.corpora):
        kwargs = protocol.kv_kwargs(corpus)
        policies = [make_kv_policy(spec, kwargs) for spec in specs]
        for spec, policy in zip(specs, policies, strict=True):
            policy.name = spec  # rows by spec (two agents may share a name)
        print(f"[{index + 1}/{len(protocol.corpora)}] key-cache: {corpus}, {len(specs)} policies", flush=True)
        rows = kv_comparison(policies, kwargs, protocol.kv_prompts, protocol.kv_budgets, "test")
        for row in rows:
            records[row.policy].append(_kv_record(row, protocol.kv_task, corpus))
    return records


def write_entry(folder: Path, records: list[dict[str, Any]], command: str) -> None:
    """``folder/results.csv`` and ``folder/README.md`` (the command, the date, the machine), atomically.

    Records of tasks ``records`` does not hold are kept from the folder's results.csv (an entry run in the key-cache
    task keeps its prefill tasks' cells, and the other way round).
    """
    folder.mkdir(parents=True, exist_ok=True)
    tasks = {record["task"] for record in records}
    kept = [record for record in read_entries(folder.parent).get(folder.name, []) if record["task"] not in tasks]
    records = kept + records
    lines = [",".join(FIELDS)]
    lines += [",".join(_csv_value(record.get(name, math.nan)) for name in FIELDS) for record in records]
    write_text_atomic(folder / "results.csv", "\n".join(lines) + "\n")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or '?'})"
    readme = (
        f"# {folder.name}\n\n"
        f"```bash\n{command}\n```\n\n"
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}\n"
        f"- machine: {platform.system()} {platform.machine()}, {device}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}\n"
        f"- protocol: `agents.leaderboard.PROTOCOL` ({len(records)} cells)\n"
    )
    write_text_atomic(folder / "README.md", readme)


def _csv_value(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def read_entries(root: Path) -> dict[str, list[dict[str, Any]]]:
    """Every entry under ``root``: its name and its results.csv records (numbers as floats)."""
    entries = {}
    for path in sorted(root.glob("*/results.csv")):
        with open(path, newline="") as handle:
            records = []
            for record in csv.DictReader(handle):
                records.append({k: (v if k in ("task", "corpus") else float(v)) for k, v in record.items()})
        entries[path.parent.name] = records
    return entries


def headroom_by_cell(entries: dict[str, list[dict[str, Any]]]) -> dict[tuple, tuple[float, float]]:
    """Per (task, corpus, budget): (best fixed KL, ceiling KL) over the reference entries present."""
    cells: dict[tuple, tuple[float, float]] = {}
    for name, records in entries.items():
        for record in records:
            key = (record["task"], record["corpus"], record["budget"])
            fixed, ceiling = cells.get(key, (math.inf, math.inf))
            if name.startswith(FIXED_RULES):
                fixed = min(fixed, record["kl"])
            if name.startswith(CEILING):
                ceiling = min(ceiling, record["kl"])
            cells[key] = (fixed, ceiling)
    return cells


def ranked_tables(entries: dict[str, list[dict[str, Any]]]) -> str:
    """The ranked markdown table of every task: entries by mean headroom captured (then by mean KL)."""
    cells = headroom_by_cell(entries)
    out = []
    for task in sorted({record["task"] for records in entries.values() for record in records}):
        rows = []
        for name, records in entries.items():
            mine = [record for record in records if record["task"] == task]
            if not mine:
                continue
            fixed_sum = ceiling_sum = kl_sum = 0.0
            comparable, beats = 0, 0
            for record in mine:
                fixed, ceiling = cells[(task, record["corpus"], record["budget"])]
                if math.isfinite(fixed) and ceiling < fixed:
                    fixed_sum, ceiling_sum, kl_sum = fixed_sum + fixed, ceiling_sum + ceiling, kl_sum + record["kl"]
                    comparable += 1
                beats += record["kl"] < fixed
            # over the cells (sums, not a mean of ratios: a cell whose ceiling is close to its bar would swamp it)
            captured = (fixed_sum - kl_sum) / (fixed_sum - ceiling_sum) if comparable else math.nan
            means = {key: float(np.mean([record.get(key, math.nan) for record in mine])) for key in FIELDS[4:]}
            rows.append((name, captured, beats, len(mine), means))
        rows.sort(key=lambda row: (-row[1] if math.isfinite(row[1]) else math.inf, row[4]["kl"]))
        if task == PROTOCOL.kv_task:
            out += _kv_table(rows)
            continue
        out += [
            f"### {task}\n",
            "| rank | entry | headroom captured | cells below the best fixed rule | KL | ΔPPL % | FLOPs (logits) | "
            "FLOPs (+overhead) | FLOPs (+overhead +policy) | decision ms/episode |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for rank, (name, captured, beats, count, mean) in enumerate(rows, 1):
            mean = mean.__getitem__
            shown = f"{captured:.2f}" if math.isfinite(captured) else "-"
            out.append(
                f"| {rank} | [{name}]({name}/README.md) | {shown} | {beats}/{count} | {mean('kl'):.4f} | "
                f"{mean('delta_ppl_percent'):+.2f} | {mean('flops_logits_ratio'):.3f} | {mean('flops_ratio'):.3f} | "
                f"{mean('flops_with_policy_ratio'):.3f} | {mean('decision_ms'):.1f} |"
            )
        out.append("")
    return "\n".join(out)


def _kv_table(rows: list[tuple]) -> list[str]:
    """The key-cache task's ranked rows (its own columns: the key cache used and the decision's cost)."""
    out = [
        f"### {PROTOCOL.kv_task}\n",
        "| rank | entry | headroom captured | cells below the best fixed rule | KL | key cache | "
        "decision FLOPs (% of 1024 tokens) | decision ms/prompt |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rank, (name, captured, beats, count, mean) in enumerate(rows, 1):
        shown = f"{captured:.2f}" if math.isfinite(captured) else "-"
        share = "- (ceiling)" if not math.isfinite(mean["decision_share"]) else f"{100 * mean['decision_share']:.3g}"
        out.append(
            f"| {rank} | [{name}]({name}/README.md) | {shown} | {beats}/{count} | {mean['kl']:.5f} | "
            f"{mean['cache_ratio']:.3f} | {share} | {mean['decision_ms']:.0f} |"
        )
    return [*out, ""]


def write_leaderboard(root: Path) -> Path:
    """``root/README.md`` regenerated from the entries' folders."""
    entries = read_entries(root)
    protocol = PROTOCOL
    text = (
        "# Leaderboard: rank policies under one protocol\n\n"
        "Regenerated by `python -m agents.leaderboard --regenerate` from the folders below; each folder's README "
        "says how its entry was run.\n\n"
        f"Protocol (`agents.leaderboard.PROTOCOL`): tasks {', '.join(f'`{t}` ({e})' for t, e in protocol.tasks)}; "
        f"test splits of {', '.join(protocol.corpora)}; logit-FLOPs budgets "
        f"{', '.join(f'{b:g}' for b in protocol.budgets)}; {protocol.episodes} episodes per cell, seeds "
        f"{protocol.seed}-{protocol.seed + protocol.episodes - 1}; and `{protocol.kv_task}` ({KVCACHE_ENV_ID}, its "
        f"defaults): the first {protocol.kv_prompts} test prompts of each corpus at key-cache budgets "
        f"{', '.join(f'{b:g}' for b in protocol.kv_budgets)}. Means over the cells an entry ran.\n\n"
        "- **headroom captured**: (best fixed − KL) / (best fixed − ceiling), each summed over the cells, best fixed "
        "the lower KL of the `uniform` and `static` entries in a cell, ceiling the lowest of the `hindsight` entries; "
        "1 matches the per-input ceiling, 0 the best fixed rule.\n"
        "- **KL**: per token, of the next-token distribution from the full model's. **FLOPs**: over full attention's, "
        "of the `Q Kᵀ` logits, with the spectra and projections, and with the policy's own per-input signal.\n"
        "- **decision ms/episode**: the median wall-clock of the policy's decisions per episode, its signal "
        "included, on the machine its README names.\n"
        "- **key cache** (key-cache task): the key bytes used over the full key cache's; **decision FLOPs**: the "
        "FLOPs of the policy's signal per prompt over those of generating 1024 tokens.\n\n" + ranked_tables(entries)
    )
    path = root / "README.md"
    write_text_atomic(path, text)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m agents.leaderboard",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("policies", nargs="*", help="policy specs (agents.zoo): baselines and saved agents")
    parser.add_argument("--name", help="the entry's folder name (one policy only; default: from the spec)")
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=PROTOCOL.task_names,
        help=f"run only these tasks (default: the prefill's, {', '.join(task for task, _ in PROTOCOL.tasks)}; "
        f"{PROTOCOL.kv_task} runs only when named: its specs are oracle.kvcache's rules or agents trained in "
        f"{KVCACHE_ENV_ID})",
    )
    parser.add_argument("--out", default="leaderboard", help="the leaderboard's folder (default: leaderboard)")
    parser.add_argument("--regenerate", action="store_true", help="only rewrite OUT/README.md from the folders")
    parser.add_argument("--trust-pickle", action="store_true", help="allow SB3 .zip agents (pickles)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        root = check_output_folder(args.out, "--out")
        if not args.policies and not args.regenerate:
            raise ValueError("give policy specs to run, or --regenerate")
        if args.name and len(args.policies) != 1:
            raise ValueError("--name names one entry: give exactly one policy with it")
        prefill_tasks = [task for task, _ in PROTOCOL.tasks if args.tasks is None or task in args.tasks]
        kv = args.tasks is not None and PROTOCOL.kv_task in args.tasks
        for spec in args.policies:
            if prefill_tasks:
                check_policy_spec(spec, "policies")
            if kv:
                check_kv_spec(spec, "policies (key-cache task)")
        kv_records = run_kv_entries(args.policies) if kv else {}
        for spec in args.policies:
            name = args.name or entry_name(spec)
            records = run_entry(spec, tasks=prefill_tasks, trust_pickle=args.trust_pickle) if prefill_tasks else []
            records += kv_records.get(spec, [])
            command = shlex.join(["python", "-m", "agents.leaderboard", spec, "--name", name]
                                 + (["--tasks", *args.tasks] if args.tasks else []))  # fmt: skip
            write_entry(root / name, records, command)
            print(f"wrote {root / name}")
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {write_leaderboard(root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
