"""The evaluation's figures (matplotlib, headless): Pareto front, Figs. 2-5 of the paper, measured."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from drrl_env.attention.flops import full_attention_flops, low_rank_attention_flops  # noqa: E402
from drrl_env.attention.hook import AttentionCall, install  # noqa: E402
from drrl_env.guardrail import transition_energies, truncation_errors  # noqa: E402
from drrl_env.lm.corpora import corpus_tokens, sequential_chunks  # noqa: E402
from drrl_env.lm.models import load_causal_lm, resolve_device  # noqa: E402
from drrl_env.lm.scoring import FixedRankHandler, forward_seconds  # noqa: E402

if TYPE_CHECKING:
    from agents.results import EvaluationRow


def pareto_figure(rows: list[EvaluationRow]) -> Figure:
    """PPL against attention FLOPs (overheads included) for every policy, one panel per corpus.

    Colour: the policy; marker: the spectral mode (hollow: without the guardrail); dashed line:
    the model without the hook on the same text.
    """
    corpora = list(dict.fromkeys(row.corpus for row in rows))
    figure, axes = plt.subplots(1, len(corpora), figsize=(4.8 * len(corpora) + 2.5, 4.4), squeeze=False)
    markers = {"separate": "o", "joint": "s"}
    policies = list(dict.fromkeys(row.policy.removesuffix(" (no guardrail)") for row in rows))
    colours = {name: plt.cm.tab20(i % 20) for i, name in enumerate(policies)}
    for axis, corpus in zip(axes[0], corpora, strict=True):
        subset = [row for row in rows if row.corpus == corpus]
        for row in subset:
            name = row.policy.removesuffix(" (no guardrail)")
            hollow = row.policy.endswith("(no guardrail)")
            axis.scatter(
                row.flops_ratio,
                row.ppl,
                marker=markers.get(row.mode, "x"),
                s=40,
                facecolors="none" if hollow else colours[name],
                edgecolors=colours[name],
            )
        axis.axhline(np.mean([row.ppl_full for row in subset]), color="grey", ls="--", lw=1)
        axis.set(xlabel="attention FLOPs / full (overheads included)", ylabel="PPL", title=corpus)
    handles = [plt.Line2D([], [], marker="o", ls="", color=colours[name], label=name[:32]) for name in policies]
    handles += [plt.Line2D([], [], marker=m, ls="", color="k", label=f"{mode} mode") for mode, m in markers.items()]
    handles += [
        plt.Line2D([], [], marker="o", ls="", markerfacecolor="none", color="k", label="no guardrail"),
        plt.Line2D([], [], ls="--", color="grey", label="model without hook"),
    ]
    figure.legend(handles=handles, loc="center right", fontsize=7)
    figure.tight_layout(rect=(0, 0, 1 - 2.3 / figure.get_figwidth(), 1))
    return figure


def budget_figure(rows: list[EvaluationRow], metric: str, label: str, log_scale: bool = False) -> Figure:
    """``metric`` (a row attribute: ``ppl``, ``kl``) against the logit-FLOPs budget, one line per policy.

    One panel per (mode, corpus); rows without a budget (no ``--budgets``) are left out; for PPL a
    dashed line marks the model without the hook on the same text. ``log_scale``: a log y axis (KL
    spans orders of magnitude between policies).
    """
    rows = [row for row in rows if row.budget is not None]
    panels = list(dict.fromkeys((row.mode, row.corpus) for row in rows))
    columns = max(1, len({corpus for _, corpus in panels}))
    lines = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(lines, columns, figsize=(4.6 * columns + 2.5, 3.8 * lines), squeeze=False)
    policies = list(dict.fromkeys(row.policy for row in rows))
    colours = {name: plt.cm.tab20(i % 20) for i, name in enumerate(policies)}
    for axis, (mode, corpus) in zip(axes.flat, panels, strict=False):
        subset = [row for row in rows if (row.mode, row.corpus) == (mode, corpus)]
        for name in policies:
            points = sorted((row.budget, getattr(row, metric)) for row in subset if row.policy == name)
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", ms=3, color=colours[name], label=name[:32])
        if metric == "ppl":
            axis.axhline(np.mean([row.ppl_full for row in subset]), color="grey", ls="--", lw=1)
        axis.set(xlabel="logit-FLOPs budget (share of full attention)", ylabel=label, title=f"{corpus}, {mode}")
        if log_scale:
            axis.set_yscale("log")
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    handles, names = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="center right", fontsize=7)
    figure.tight_layout(rect=(0, 0, 1 - 2.3 / figure.get_figwidth(), 1))
    return figure


def rank_heatmap_figure(row: EvaluationRow) -> Figure:
    """Fig. 3: the mean rank chosen per layer and segment."""
    grid = np.asarray(row.rank_grid)
    figure, axis = plt.subplots(figsize=(2.5 + 0.6 * grid.shape[1], 0.25 * grid.shape[0] + 1.5))
    image = axis.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
    budget = "" if row.budget is None else f", budget {row.budget:g}"
    axis.set(xlabel="segment", ylabel="layer", title=f"{row.policy} ({row.mode}, {row.corpus}{budget})")
    figure.colorbar(image, ax=axis, label="mean rank")
    figure.tight_layout()
    return figure


def contrasting_inputs_figure(agent: EvaluationRow, static: EvaluationRow | None) -> Figure:
    """Does it adapt? The agent's ranks per layer on the two inputs where they differ most, beside static's.

    The two episodes are those whose per-layer rank vectors are furthest apart (L1); each line's
    label gives its KL from the full model. A policy that plays the same ranks on every input draws one line.
    """
    ranks = np.asarray(agent.episode_rank_per_layer)  # (episodes, L)
    distance = np.abs(ranks[:, None, :] - ranks[None, :, :]).sum(-1)
    first, second = np.unravel_index(int(distance.argmax()), distance.shape)
    figure, axis = plt.subplots(figsize=(7, 3.2))
    layers = np.arange(ranks.shape[1])
    if first == second:  # the same ranks on every input
        label = f"{agent.policy}, all {len(ranks)} inputs (the same ranks; KL {agent.kl:.4f} mean)"
        axis.plot(layers, ranks[first], "-o", markersize=3, label=label)
    else:
        for episode, style in ((first, "-o"), (second, "-s")):
            label = f"{agent.policy}, input {episode} (KL {agent.episode_kl[episode]:.4f})"
            axis.plot(layers, ranks[episode], style, markersize=3, label=label)
    if static is not None:
        axis.plot(layers, static.rank_per_layer, "k--", label=f"{static.policy} (KL {static.kl:.4f} mean)")
    budget = "" if agent.budget is None else f", budget {agent.budget:g}"
    axis.set(xlabel="layer", ylabel="rank", title=f"two contrasting inputs ({agent.mode}, {agent.corpus}{budget})")
    axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def contrasting_inputs_figures(rows: list[EvaluationRow], corpus: str) -> list[tuple[str, Figure]]:
    """:func:`contrasting_inputs_figure` of every saved agent's row on ``corpus`` (with at least two episodes).

    A saved agent's row is one whose policy is not a baseline spec (its name has the ``ALGO:NAME`` form of
    ``agents.agent_file.short_id``); its static row is the ``static`` row of the same mode and budget.
    """
    from agents.algorithms import ALGORITHMS

    figures = []
    for row in rows:
        if row.corpus != corpus or len(row.episode_rank_per_layer) < 2 or row.policy.split(":")[0] not in ALGORITHMS:
            continue
        same_cell = [r for r in rows if (r.corpus, r.mode, r.budget) == (corpus, row.mode, row.budget)]
        static = next((r for r in same_cell if r.policy.startswith("static")), None)
        figures.append((figure_name("fig3_inputs", row), contrasting_inputs_figure(row, static)))
    return figures


def figure_name(kind: str, row: EvaluationRow) -> str:
    """A row's figure file stem: ``KIND_POLICY_MODE[_budgetB]``, the policy name made safe for a file name."""
    safe = row.policy.replace(":", "_").replace("/", "_").replace(" ", "_")
    budget = "" if row.budget is None else f"_budget{row.budget:g}"
    return f"{kind}_{safe}_{row.mode}{budget}"


def sequence_length_figure(
    model: str, corpus: str, lengths: list[int], rank: int, mode: str, device: str = "auto", repeats: int = 2
) -> tuple[Figure, list[dict[str, Any]]]:
    """Fig. 4: attention FLOPs and measured forward wall-clock against sequence length, full vs rank ``rank``."""
    loaded = load_causal_lm(model, device=str(resolve_device(device)))
    shape = loaded.attention_shape
    tokens = corpus_tokens(corpus, "test", loaded.tokenizer)
    points = []
    for n in lengths:
        if tokens.numel() < n:
            continue
        batch = sequential_chunks(tokens, n)[:1]
        times = {
            name: forward_seconds(loaded, batch, handler, repeats=repeats)
            for name, handler in (("full", None), ("low-rank", FixedRankHandler(rank, mode)))
        }
        full = full_attention_flops(1, shape.q_heads, n, n, shape.head_dim)
        low = low_rank_attention_flops(1, shape.q_heads, shape.kv_heads, n, n, shape.head_dim, rank, mode)
        points.append(
            {
                "seq_len": n,
                "flops_full": full.total,
                "flops_low_rank": low.total,
                "flops_low_rank_core": low.core,
                "seconds_full": times["full"],
                "seconds_low_rank": times["low-rank"],
            }
        )
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    n = [p["seq_len"] for p in points]
    left.plot(n, [p["flops_full"] for p in points], "o-", label="full")
    left.plot(n, [p["flops_low_rank"] for p in points], "s-", label=f"r={rank} (+overhead)")
    left.plot(n, [p["flops_low_rank_core"] for p in points], "s--", label=f"r={rank} (core)")
    left.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="attention FLOPs per layer")
    right.plot(n, [p["seconds_full"] for p in points], "o-", label="full")
    right.plot(n, [p["seconds_low_rank"] for p in points], "s-", label=f"r={rank}, {mode}")
    right.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="forward wall-clock (s)")
    for axis in (left, right):
        axis.legend()
    figure.suptitle(f"{model} on {loaded.device.type}: attention cost against sequence length")
    figure.tight_layout()
    return figure, points


def captured_call(model: str, corpus: str, seq_len: int, layer: int, device: str = "auto") -> AttentionCall:
    """The attention call of ``layer`` on the first test chunk of ``corpus`` (full attention everywhere)."""
    loaded = load_causal_lm(model, device=str(resolve_device(device)))
    batch = sequential_chunks(corpus_tokens(corpus, "test", loaded.tokenizer), seq_len)[:1].to(loaded.device)
    captured: list[AttentionCall] = []

    def handler(call: AttentionCall) -> torch.Tensor:
        if call.layer == layer:
            captured.append(call)
        return call.full()

    with torch.no_grad(), install(loaded.model).use(handler):
        loaded.model(input_ids=batch, logits_to_keep=1)
    return captured[0]


def perturbation_figure(call: AttentionCall, ranks: tuple[int, ...]) -> Figure:
    """Fig. 5: relative logit perturbation of every transition r -> r' (Eq. 9 bound and exact), and the exact error.

    The third panel is what the ``exact`` guardrail masks by: the error of rank r against full
    attention, ``||S - S_r||_F / ||S||_F``, in both modes, beside the Eq. 9 bound on the same
    quantity (the transition d -> r in ``separate`` mode).
    """
    candidates = torch.as_tensor(ranks)
    kv_heads, head_dim = call.key.shape[1], call.key.shape[-1]
    panels = {}
    for mode, title in (("separate", "Eq. 9 bound (separate mode)"), ("joint", "exact, optimal truncation (joint)")):
        grid = torch.stack(
            [
                transition_energies(call, torch.full((kv_heads,), r), candidates, mode).relative(per_group=False)
                for r in ranks
            ]
        )  # (from, to)
        panels[title] = grid.cpu().numpy()
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    vmax = max(p.max() for p in panels.values())
    for axis, (title, grid) in zip(axes, panels.items(), strict=False):
        image = axis.imshow(grid, origin="lower", cmap="magma", vmin=0, vmax=vmax)
        axis.set_xticks(range(len(ranks)), ranks)
        axis.set_yticks(range(len(ranks)), ranks)
        axis.set(xlabel="r' (to)", ylabel="r (from)", title=title)
        figure.colorbar(image, ax=axis, label="||dA||_F / ||A||_F")
    full = torch.full((kv_heads,), head_dim)
    curves = {
        "separate: exact (guardrail='exact')": truncation_errors(call, candidates, "separate"),
        "separate: Eq. 9 bound from d": transition_energies(call, full, candidates, "separate"),
        "joint: exact (Eckart-Young)": truncation_errors(call, candidates, "joint"),
    }
    for label, errors in curves.items():
        axes[2].plot(ranks, errors.relative(per_group=False).cpu().numpy(), "o-", label=label)
    axes[2].set(xlabel="rank r", ylabel="||S - S_r||_F / ||S||_F", title="error against full attention", yscale="log")
    axes[2].legend(fontsize=8)
    figure.suptitle(f"logit perturbation of rank transitions, layer {call.layer}")
    figure.tight_layout()
    return figure


def training_curves_figure(runs: Path) -> Figure | None:
    """Fig. 2: training curves (episode return and reward terms) of every TensorBoard run under ``runs``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = ("rollout/ep_rew_mean", "drrl/fidelity", "drrl/flops_saved", "drrl/perturbation")
    runs_found = sorted({p.parent for p in Path(runs).rglob("events.out.tfevents.*")})
    curves: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for run in runs_found:
        events = EventAccumulator(str(run)).Reload()
        available = set(events.Tags().get("scalars", []))
        curves[run.name] = {
            tag: ([e.step for e in events.Scalars(tag)], [e.value for e in events.Scalars(tag)])
            for tag in tags
            if tag in available
        }
    curves = {name: c for name, c in curves.items() if c}
    if not curves:
        return None
    figure, axes = plt.subplots(1, len(tags), figsize=(4.5 * len(tags), 3.8))
    for axis, tag in zip(axes, tags, strict=True):
        for name, run_curves in curves.items():
            if tag in run_curves:
                axis.plot(*run_curves[tag], label=name[:40])
        axis.set(title=tag, xlabel="env steps")
    axes[0].legend(fontsize=6)
    figure.tight_layout()
    return figure
