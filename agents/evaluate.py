"""``python -m agents.evaluate``: every policy over held-out text, with its ranks really in place.

For each policy (baseline specs such as ``fixed:32`` and ``energy:0.9``, and saved model files),
corpus and spectral mode, it runs seeded episodes of DRRL-Attention-v0 on the test split. Each
episode is one forward pass of the LM over a batch with the policy's ranks replacing the
attention of every layer (and segment), so the LM loss is measured, not estimated. Reported:

* PPL of the policy and, on the same batches, of the model without the hook (``PPL full``);
* attention FLOPs over full attention's: of the logits alone (the ``Q K^T`` product, which a
  ``flops_budget`` constrains), of the core, and with the SVD and projection overheads
  (``drrl_env.attention.flops``; the policy network's own cost is not counted);
* the mean per-token KL of the next-token distribution from the full model's;
* wall-clock per token of a forward pass that replays the policy's ranks (spectra included,
  the policy's decision excluded), against the plain model timed in the same run;
* the mean rank, per layer, and the guardrail violation rate (for algorithms without masks).

It writes ``results/`` (``table.md``, ``results.csv`` and PNG figures: the Pareto front, rank
heatmaps (Fig. 3), FLOPs and wall-clock against sequence length (Fig. 4), the perturbation bound
over (r, r') (Fig. 5), and training curves (Fig. 2) from ``--runs``), and the same scalars and
figures to TensorBoard.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

from agents.algorithms import ModelPolicy
from agents.results import EvaluationRow, adaptivity_verdicts, fill_headroom_captured, markdown_table, write_csv
from agents.rllib_agent import RLlibPolicy
from agents.tensorboard import write_evaluation
from agents.zoo import check_policy_spec, make_policy
from drrl_env import ENV_ID
from drrl_env.attention.lowrank import SPECTRAL_MODES
from drrl_env.cli import ENV_IDS, add_env_arguments, env_id_of, env_kwargs, share_or_none
from drrl_env.env import DRRLAttentionEnv
from drrl_env.kvcache import KVCACHE_ENV_ID
from drrl_env.lm.corpora import corpus_tokens, sequential_chunks
from drrl_env.lm.files import check_output_folder
from drrl_env.lm.scoring import LayerRanksHandler, forward_seconds
from oracle.policy import RankPolicy

DEFAULT_POLICIES = ("full", "fixed:32", "energy:0.9", "random", "stable_rank", "threshold:0.1", "gumbel:0.05", "oracle")
DEFAULT_CORPORA = ("wiki", "news", "shakespeare")


def time_forward(env: DRRLAttentionEnv, ranks: tuple | None, repeats: int, tokens: torch.Tensor) -> float:
    """Milliseconds per token of a forward pass over ``tokens (B, n)`` with ``ranks`` replayed (None: plain model)."""
    handler = None if ranks is None else LayerRanksHandler(ranks, env.config.spectral_mode)
    return 1e3 * forward_seconds(env.loaded, tokens, handler, env.config.segment_len, repeats) / tokens.numel()


def evaluate_policy(
    policy: RankPolicy,
    env_kwargs: dict[str, Any],
    episodes: int = 4,
    seed: int = 10_000,
    timing_repeats: int = 2,
    split: str = "test",
) -> EvaluationRow:
    """Run ``policy`` over ``episodes`` seeded episodes of ``split``; see the module docstring for what is measured.

    The test split reports; the validation split selects (hyperparameters, checkpoints) without touching it.
    """
    # the reward is not used here; eq13 lets the greedy oracle score candidates, and the reference pass gives the KL
    kwargs = {**env_kwargs, "split": split, "reward": "eq13", "terminal_lm_weight": 1.0}
    kwargs.update(kl_baseline="none", kl_credit="terminal")
    if not isinstance(policy, (ModelPolicy, RLlibPolicy)):
        kwargs["sensitivity_samples"] = 0  # only a trained agent reads the observation's sensitivity part
    env: DRRLAttentionEnv = gym.make(ENV_ID, **kwargs).unwrapped
    cfg = env.config
    episode_grids = []
    decision_flops = float(getattr(policy, "flops_per_decision", 0.0))
    losses, full_losses, kls, ranks, violations, decision_seconds = [], [], [], [], [], []
    flops = flops_core = flops_full = flops_logits = flops_logits_full = profile_flops = 0.0
    try:
        for episode in range(episodes):
            observation, reset_info = env.reset(seed=seed + episode)
            profile_flops += reset_info["flops_sensitivity"]  # the observation's Fisher profile: the agent's cost
            deciding = reset_info["seconds_sensitivity"]  # the observation's signal is the agent's decision time too
            started = time.perf_counter()
            policy.reset(seed + episode)
            deciding += time.perf_counter() - started
            terminated = False
            episode_grid = np.zeros((env.num_layers, env.num_segments))
            while not terminated:
                started = time.perf_counter()
                action = policy.act(observation, env.action_masks(), env)
                deciding += time.perf_counter() - started
                observation, _, terminated, _, info = env.step(action)
                rank = float(np.mean(info["rank"]))
                episode_grid[info["layer"], info["segment"]] = rank
                ranks.append(rank)
                violations.append(info["masked_violation"])
                flops, flops_core, flops_full = (
                    flops + info["flops"],
                    flops_core + info["flops_core"],
                    flops_full + info["flops_full"],
                )
                flops_logits += info["flops_logits"]
                flops_logits_full += info["flops_logits_full"]
            kls.append(info["kl"])
            decision_seconds.append(deciding)
            profile_flops += float(getattr(policy, "profile_flops", 0.0))  # a hindsight rule's own profile
            episode_grids.append(episode_grid)
            losses.append(info["lm_loss"])
            full_losses.append(info["lm_loss_full"])
        grid = np.mean(episode_grids, axis=0)  # (L, S): the mean rank of each layer and segment
        timing_tokens = sequential_chunks(corpus_tokens(cfg.corpus, split, env.loaded.tokenizer), cfg.seq_len)
        timing_tokens = timing_tokens[: cfg.batch_size]
        replay = tuple(tuple(int(round(r)) for r in row) for row in grid)
        ms = time_forward(env, replay, timing_repeats, timing_tokens) if timing_repeats else float("nan")
        ms_full = time_forward(env, None, timing_repeats, timing_tokens) if timing_repeats else float("nan")
    finally:
        env.close()
    return EvaluationRow(
        policy=policy.name,
        corpus=cfg.corpus,
        mode=cfg.spectral_mode,
        episodes=episodes,
        tokens=episodes * cfg.batch_size * (cfg.seq_len - 1),
        nll=float(np.mean(losses)),
        nll_full=float(np.mean(full_losses)),
        flops_ratio=flops / flops_full,
        flops_core_ratio=flops_core / flops_full,
        flops_logits_ratio=flops_logits / flops_logits_full,
        kl=float(np.mean(kls)),
        mean_rank=float(np.mean(ranks)),
        violation_rate=float(np.mean(violations)),
        ms_per_token=ms,
        ms_per_token_full=ms_full,
        rank_per_layer=grid.mean(axis=1).round(2).tolist(),
        rank_grid=grid.round(2).tolist(),
        flops_policy_ratio=(decision_flops * len(ranks) + profile_flops) / flops_full,
        episode_rank_per_layer=[episode_grid.mean(axis=1).round(2).tolist() for episode_grid in episode_grids],
        episode_kl=[float(kl) for kl in kls],
        decision_ms=1e3 * float(np.median(decision_seconds)),
    )


def comparison_table(
    policies: list[RankPolicy],
    env_kwargs: dict[str, Any],
    episodes: int,
    timing_repeats: int,
    csv_path: Path | None = None,
) -> str:
    """The training commands' closing comparison: every policy over the same seeded test episodes, as markdown.

    The table has the summary columns; ``csv_path`` gets every column.
    """
    rows = [
        evaluate_policy(policy, env_kwargs, episodes, timing_repeats=timing_repeats)
        for policy in tqdm(policies, desc="comparing on the test split", unit="policy")
    ]
    fill_headroom_captured(rows)
    if csv_path is not None:
        write_csv(rows, csv_path)
    budget = env_kwargs.get("flops_budget")
    return (
        f"\ntest split of {env_kwargs['corpus']}, {episodes} episodes of {env_kwargs['batch_size']}x"
        f"{env_kwargs['seq_len']} tokens, mode={env_kwargs['spectral_mode']}, per_head={env_kwargs['per_head']}, "
        f"flops_budget={budget}; KL per token from the full model; FLOPs over full attention's"
        f"{'' if csv_path is None else f'; every column in {csv_path}'}\n{markdown_table(rows, summary=True)}"
    )


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The evaluation's options; the env options' defaults are those of ``--env`` (read first from ``argv``)."""
    env_id = env_id_of(argv)
    parser = argparse.ArgumentParser(
        prog="python -m agents.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--policies",
        nargs="+",
        default=list(DEFAULT_POLICIES),
        help="policy specs: baselines (full, fixed:R, energy:T, random, stable_rank[:SAFETY], threshold:D, "
        "gumbel:TAU, static:FLOPS_BUDGET, static:match (the FLOPs of the saved model before it), oracle) "
        "and saved agents (PATH.safetensors; SB3 zips PATH.zip or ALGO:PATH.zip only with --trust-pickle) "
        f"(default: {' '.join(DEFAULT_POLICIES)})",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow SB3 .zip models in --policies: they are pickles, and a crafted one runs code when loaded",
    )
    parser.add_argument(
        "--corpora",
        nargs="+",
        default=list(DEFAULT_CORPORA),
        help="held-out corpora, their --split (test unless given; validation is for choosing, not reporting) "
        "(default: all three)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=SPECTRAL_MODES,
        default=None,
        help="spectral modes, one cell each (default: the env's --spectral-mode)",
    )
    parser.add_argument(
        "--episodes", type=int, default=4, help="test episodes per policy, corpus and mode (default: 4)"
    )
    parser.add_argument("--seed", type=int, default=10_000, help="episode i is seeded with seed + i (default: 10000)")
    parser.add_argument(
        "--timing-repeats", type=int, default=2, help="timed replays per row for ms/token, 0 to skip (default: 2)"
    )
    parser.add_argument(
        "--budgets",
        nargs="+",
        type=share_or_none,
        metavar="SHARE",
        help="run every cell at each of these logit-FLOPs budgets (e.g. 0.75 0.625 0.5; 'none': no budget) instead "
        "of --flops-budget; adds the budget column and the PPL- and KL-against-budget figures",
    )
    parser.add_argument("--ablations", action="store_true", help="add Table II rows: every policy with --guardrail off")
    parser.add_argument(
        "--out", default="results", help="folder of table.md, results.csv and the PNGs (default: results)"
    )
    parser.add_argument(
        "--runs", default=None, help="TensorBoard runs folder to draw training curves from (Fig. 2), e.g. runs"
    )
    parser.add_argument(
        "--logdir", default="runs", help="TensorBoard folder for the evaluation's scalars and figures (default: runs)"
    )
    parser.add_argument(
        "--fig4-lengths",
        type=int,
        nargs="*",
        default=[256, 512, 1024, 2048, 4096],
        help="sequence lengths of Fig. 4 (none: skip it) (default: 256 512 1024 2048 4096)",
    )
    add_env_arguments(parser, env_id, split="test")
    return parser


@dataclass
class EvaluationPlan:
    """Which cells an evaluation runs: policies x corpora x modes x budgets (x guardrail on/off), and how."""

    policies: tuple[str, ...] = DEFAULT_POLICIES
    """policy specs (agents.zoo): baselines and saved agents"""
    corpora: tuple[str, ...] = DEFAULT_CORPORA
    """held-out corpora"""
    modes: tuple[str, ...] = ("joint",)
    """spectral modes"""
    budgets: tuple[float | None, ...] | None = None
    """logit-FLOPs budgets, one cell each; None: the env's flops_budget, and no budget column"""
    ablations: bool = False
    """add every cell again with the guardrail off (Table II)"""
    episodes: int = 4
    """test episodes per cell; episode i is seeded with seed + i"""
    seed: int = 10_000
    timing_repeats: int = 2
    """timed replays per row for ms/token (0: skip)"""
    trust_pickle: bool = False
    """allow SB3 .zip agents (pickles)"""


def run_evaluation(plan: EvaluationPlan, base: dict[str, Any]) -> list[EvaluationRow]:
    """Evaluate every (policy, corpus, mode[, ablation], budget) cell of ``plan`` in the env ``base``.

    ``base`` holds the ``gym.make`` keywords; its split is the one evaluated.

    ``static:match`` takes as its budget the logit-FLOPs ratio measured for the first saved model
    listed before it, in the same corpus, mode and guardrail setting: the static allocation at
    the agent's FLOPs, the comparison that says whether adapting to the input pays.
    """
    for spec in plan.policies:
        if spec != "static:match":  # its budget is the agent's, measured below
            check_policy_spec(spec, "--policies")
    budgets = plan.budgets or [base["flops_budget"]]
    settings = [(corpus, mode, True, budget) for budget in budgets for corpus in plan.corpora for mode in plan.modes]
    if plan.ablations:
        settings += [(corpus, mode, False, budget) for corpus, mode, _, budget in settings]
    cells = [(spec, *setting) for setting in settings for spec in plan.policies]
    rows: list[EvaluationRow] = []
    matched: dict[tuple, tuple[str, float]] = {}
    for spec, corpus, mode, guardrail, budget in tqdm(cells, desc="evaluating policies", unit="cell"):
        kwargs = {
            **base,
            "corpus": corpus,
            "spectral_mode": mode,
            "guardrail": base["guardrail"] if guardrail else "off",
            "flops_budget": budget,
        }
        setting = (corpus, mode, guardrail, budget)
        matched_to = None
        if spec == "static:match":
            if setting not in matched:
                raise ValueError("static:match needs a saved agent listed before it in --policies")
            matched_to, share = matched[setting]
            spec = f"static:{share:.4f}"
        policy = make_policy(spec, kwargs, plan.trust_pickle)
        row = evaluate_policy(policy, kwargs, plan.episodes, plan.seed, plan.timing_repeats, split=base["split"])
        if kwargs["guardrail"] == "off" and base["guardrail"] != "off":
            row.policy += " (no guardrail)"
            matched_to = matched_to and matched_to + " (no guardrail)"
        row.matched_to = matched_to
        row.budget = budget if plan.budgets else None
        if isinstance(policy, (ModelPolicy, RLlibPolicy)):
            matched.setdefault(setting, (row.policy.removesuffix(" (no guardrail)"), row.flops_logits_ratio))
        rows.append(row)
    fill_headroom_captured(rows)
    return rows


def parse_plan(argv: list[str] | None) -> tuple[EvaluationPlan, dict[str, Any]]:
    """The evaluation plan and the env's ``gym.make`` keywords of a command line."""
    options = vars(build_parser(argv).parse_args(argv))
    base = env_kwargs(options)
    plan = EvaluationPlan(
        tuple(options["policies"]),
        tuple(options["corpora"]),
        tuple(options["modes"] or [base["spectral_mode"]]),
        tuple(options["budgets"]) if options["budgets"] else None,
        options["ablations"],
        options["episodes"],
        options["seed"],
        options["timing_repeats"],
        options["trust_pickle"],
    )
    return plan, base


def main(argv: list[str] | None = None) -> int:
    if env_id_of(argv, ENV_ID, ENV_IDS) == KVCACHE_ENV_ID:  # the key-cache task's comparison: agents.kv_evaluate
        from agents.kv_evaluate import main as kv_main

        return kv_main(argv)
    from torch.utils.tensorboard import SummaryWriter

    from agents import figures

    args = build_parser(argv).parse_args(argv)
    plan, base = parse_plan(argv)
    try:
        out = check_output_folder(args.out, "--out")
        check_output_folder(args.logdir, "--logdir")
        out.mkdir(parents=True, exist_ok=True)
        rows = run_evaluation(plan, base)
    except (FileNotFoundError, ValueError, ImportError) as error:  # ImportError: an RLlib agent without the extra
        print(f"error: {error}", file=sys.stderr)
        return 2
    verdicts = adaptivity_verdicts(rows)
    table = markdown_table(rows) + "".join(f"\n\n{line}" for line in verdicts)
    (out / "table.md").write_text(table + "\n")
    write_csv(rows, out / "results.csv")
    board = Path(args.logdir) / f"evaluate__{int(time.time())}"
    write_evaluation(rows, board, base["flops_budget"] if plan.budgets is None else None)
    writer = SummaryWriter(str(board / "figures"))
    written: list[str] = []

    def emit(name: str, figure) -> None:
        """Save ``figure`` as ``out/name.png`` and send it to TensorBoard (which closes it)."""
        figure.savefig(out / f"{name}.png", dpi=110)
        writer.add_figure(name, figure)  # the PNG's name
        written.append(name)

    emit("pareto", figures.pareto_figure(rows))
    if args.budgets and len(args.budgets) > 1:
        emit("budget_ppl", figures.budget_figure(rows, "ppl", "PPL"))
        emit("budget_kl", figures.budget_figure(rows, "kl", "KL to the full model (nats/token)", log_scale=True))
    for name, figure in figures.contrasting_inputs_figures(rows, args.corpora[0]):
        emit(name, figure)
    for row in rows:
        if row.corpus == args.corpora[0] and row.policy not in ("full",) and not row.policy.startswith("fixed"):
            emit(figures.figure_name("fig3_ranks", row), figures.rank_heatmap_figure(row))
    call = figures.captured_call(args.model, args.corpora[0], args.seq_len, rows and len(rows[0].rank_per_layer) // 2)
    emit("fig5_perturbation", figures.perturbation_figure(call, tuple(sorted(args.ranks))))
    if args.fig4_lengths:
        rank = min(args.ranks, key=lambda r: abs(r - 32))
        figure, points = figures.sequence_length_figure(
            args.model, args.corpora[0], args.fig4_lengths, rank, plan.modes[0], args.device
        )
        emit("fig4_sequence_length", figure)
        lines = ["| n | FLOPs full | FLOPs low-rank (+overhead) | s full | s low-rank |", "|---|---|---|---|---|"]
        lines += [
            f"| {p['seq_len']} | {p['flops_full']:.3g} | {p['flops_low_rank']:.3g} | {p['seconds_full']:.3f} | "
            f"{p['seconds_low_rank']:.3f} |"
            for p in points
        ]
        (out / "fig4_sequence_length.md").write_text("\n".join(lines) + "\n")
    if args.runs:
        curves = figures.training_curves_figure(Path(args.runs))
        if curves is not None:
            emit("fig2_training", curves)
    writer.close()
    print(table)
    print(f"\nwrote {out}/table.md, {out}/results.csv and {len(written)} figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
