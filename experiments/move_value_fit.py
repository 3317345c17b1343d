"""Is the room next to the Eq. S teacher learnable from what the agent sees? Move values, fitted out of sample.

``experiments/teacher_neighbourhood.py`` found that about a quarter of the budget-neutral moves from the teacher's
allocation lower the KL, and that the additive model of the Eq. S profile (what the observation shows) ranks
them only weakly. A policy that improves on its behaviour-cloned start has to learn which move helps on *this*
input from that observation. This script asks whether any function of the observation can, before any RL:
for each of ``--episodes`` batches it scores ``--moves`` random budget-neutral moves from the teacher's
allocation by their exact KL to the full model (label-free; hindsight, so this is data, not a policy), builds
features of each move from the episode's Eq. S profile alone (the additive model's change, the two groups'
marginal costs, candidates, depths, the profile's mass before and after each layer, the input's total), and
fits ridge regressions of log(KL_move / KL_teacher) leave-episodes-out (each input predicted by a fit on the
others). It prints, for the additive model and for the fitted one, the mean within-input Spearman against the
real changes, the share of helpful moves among the quarter each predicts best, and what playing each one's
single best-predicted move per input would change the KL by: the improvement over the teacher that a learned
rule over this observation could take, out of sample. A small network on the same features is fitted the same way;
the real changes themselves (hindsight) are the last row. Both fits are repeated with features the observation
does not have: the residual stream's drift from the full model's under the teacher's plan, entering and leaving
each of the two layers and at the end (from the forward pass of the teacher's plan that also gives its KL): does
a view of the layers' interaction on this input make the moves predictable?

    python experiments/move_value_fit.py [--episodes 30] [--moves 60] [--save moves.npz]
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from drrl_env.env import DRRLAttentionEnv
from drrl_env.lm.scoring import next_token_kl, replay_output
from experiments.teacher_neighbourhood import (
    add_batch_options,
    additive_change,
    allocation_kl,
    eq_s_env,
    group_ranks,
    moved,
    neutral_moves,
)
from experiments.teacher_predictability import Predictor, held_out_predictions, ridge_fit
from oracle.hindsight import HindsightOracle

RIDGES = (1.0, 10.0, 100.0)
MLP_STEPS = 300


def mlp_fit(features: np.ndarray, target: np.ndarray) -> Predictor:
    """A one-hidden-layer network (32 tanh units, Adam, weight decay) of ``target`` on standardized ``features``."""
    torch.manual_seed(0)
    mean, scale = features.mean(0), features.std(0) + 1e-9
    x = torch.tensor((features - mean) / scale, dtype=torch.float32)
    y = torch.tensor(target, dtype=torch.float32)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(MLP_STEPS):
        optimizer.zero_grad()
        ((net(x).squeeze(-1) - y) ** 2).mean().backward()
        optimizer.step()

    def predict(new: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.tensor((new - mean) / scale, dtype=torch.float32)).squeeze(-1).numpy()

    return predict


def marginal_costs(cost: np.ndarray, flat: np.ndarray, move: tuple[int, int]) -> tuple[float, float]:
    """What lowering the ``move``'s first group adds and what raising its second removes, by the profile.

    ``cost`` is ``(U, K)``, ``flat`` the flat candidate indices; both values are ``>= 0`` for a monotone profile.
    """
    down, up = move
    return cost[down, flat[down] - 1] - cost[down, flat[down]], cost[up, flat[up]] - cost[up, flat[up] + 1]


def move_features(cost: np.ndarray, indices: np.ndarray, move: tuple[int, int], kv_heads: int) -> np.ndarray:
    """Features of one budget-neutral ``move`` (flat group lowered, flat group raised) from the profile alone.

    ``cost`` is the ``(L * Hkv, K)`` Eq. S profile the observation shows, ``indices`` the teacher's ``(L, Hkv)``
    candidate indices.
    """
    flat = indices.reshape(-1)
    layers = cost.shape[0] // kv_heads
    chosen = cost[np.arange(cost.shape[0]), flat]  # each group's cost at the teacher's choice
    per_layer = chosen.reshape(layers, kv_heads).sum(1)
    down, up = move
    down_layer, up_layer = down // kv_heads, up // kv_heads
    down_cost, up_gain = marginal_costs(cost, flat, move)
    total = chosen.sum()
    return np.array([
        down_cost - up_gain, down_cost, up_gain, np.log(down_cost + 1e-9), np.log(up_gain + 1e-9),
        np.log(down_cost + 1e-9) - np.log(up_gain + 1e-9), cost[down, flat[down]], cost[up, flat[up]],
        flat[down], flat[up], down_layer / layers, up_layer / layers, (down_layer - up_layer) / layers,
        abs(down_layer - up_layer) / layers, float(down_layer == up_layer), float(down % kv_heads == up % kv_heads),
        per_layer[down_layer + 1 :].sum() / total, per_layer[up_layer + 1 :].sum() / total,
        per_layer[down_layer] / total, per_layer[up_layer] / total, np.log(total),
        down_cost * down_layer / layers, up_gain * up_layer / layers,
    ])  # fmt: skip


def residual_deviation(plan_hidden: tuple[torch.Tensor, ...], full_hidden: tuple[torch.Tensor, ...]) -> np.ndarray:
    """``(L + 1,)`` drift of the residual stream under a plan from the full model's (``hidden_states`` of both).

    Entry ``l`` is ``||h_plan - h_full|| / ||h_full||`` over the batch at the input of layer ``l`` (entry ``L``:
    after the last layer).
    """
    return np.array([float((h - f).norm() / f.norm()) for h, f in zip(plan_hidden, full_hidden, strict=True)])


def interaction_features(
    deviation: np.ndarray, cost: np.ndarray, indices: np.ndarray, move: tuple[int, int]
) -> np.ndarray:
    """Features of ``move`` from the residual stream's deviation under the teacher's plan (not in the observation).

    How far the stream has drifted entering the lowered and the raised group's layers, what each of the two
    layers adds to it, how much it grows after each, the final drift, and the drift times each group's
    marginal cost: what an observation of the layers' interaction on this input could show.
    """
    flat, kv_heads = indices.reshape(-1), indices.shape[1]
    (down, up), layers = move, indices.shape[0]
    down_layer, up_layer = down // kv_heads, up // kv_heads
    down_cost, up_gain = marginal_costs(cost, flat, move)
    final = deviation[layers]
    return np.array([
        deviation[down_layer], deviation[up_layer], deviation[down_layer + 1] - deviation[down_layer],
        deviation[up_layer + 1] - deviation[up_layer], np.log(final / deviation[down_layer + 1]),
        np.log(final / deviation[up_layer + 1]), np.log(final), deviation[down_layer] * down_cost,
        deviation[up_layer] * up_gain,
    ])  # fmt: skip


def summary(name: str, predicted: np.ndarray, actual: np.ndarray, episode: np.ndarray) -> str:
    """Within-input Spearman, helpful share among the best-predicted quarter, the best-predicted move's change."""
    rhos, helpful, picked = [], [], []
    for key in np.unique(episode):
        rows = episode == key
        p, a = predicted[rows], actual[rows]
        rhos.append(spearmanr(p, a)[0])
        helpful.append(np.mean(a[np.argsort(p)[: max(1, len(p) // 4)]] < 0))
        picked.append(a[np.argmin(p)])
    picked = np.asarray(picked)
    return (
        f"| {name} | {np.mean(rhos):.2f} | {np.mean(helpful):.0%} | {np.mean(picked):+.4f} "
        f"± {picked.std(ddof=1) / np.sqrt(len(picked)):.4f} | {np.mean(picked < 0):.0%} |"
    )


def collect(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Score ``args.moves`` random budget-neutral moves from the teacher on each of ``args.episodes`` batches."""
    env: DRRLAttentionEnv = eq_s_env(args)
    cfg, num_candidates, rng = env.config, len(env.config.ranks), np.random.default_rng(args.seed)
    teacher = HindsightOracle("scaled_delta", 16)
    rows: dict[str, list] = {"features": [], "interaction": [], "actual": [], "additive": [], "episode": []}
    start = time.time()
    for index in range(args.episodes):
        env.reset(seed=args.seed + index)
        with torch.no_grad():
            full = env.loaded.model(input_ids=env.input_ids, output_hidden_states=True)
        current = np.asarray(teacher.allocate(env))
        plan = replay_output(
            env.loaded, env.input_ids, group_ranks(env, current), cfg.spectral_mode, cfg.segment_len, True
        )  # the teacher's plan once: its KL and its residual stream
        teacher_kl = next_token_kl(full.logits, plan.logits)
        deviation = residual_deviation(plan.hidden_states, full.hidden_states)
        cost = teacher.last_profile.reshape(-1, num_candidates)
        for move in neutral_moves(current, num_candidates, args.moves, rng):
            candidate = moved(current, move, num_candidates)
            if candidate is None:
                continue
            rows["actual"].append(np.log(allocation_kl(env, candidate, full.logits) / teacher_kl))
            rows["additive"].append(additive_change(cost, current, candidate))
            rows["features"].append(move_features(cost, current, move, env.kv_heads))
            rows["interaction"].append(interaction_features(deviation, cost, current, move))
            rows["episode"].append(index)
        print(f"episode {index + 1}/{args.episodes}: {time.time() - start:.0f} s", flush=True)
    return {key: np.asarray(value) for key, value in rows.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_options(parser, episodes=30)
    parser.add_argument("--moves", type=int, default=60, help="random budget-neutral moves scored per batch")
    parser.add_argument("--save", help="write the scored moves to this .npz file")
    parser.add_argument("--load", help="read scored moves from this .npz file instead of scoring them")
    args = parser.parse_args(argv)
    data = dict(np.load(args.load)) if args.load else collect(args)
    if args.save:
        np.savez(args.save, **data)
    actual, episode = data["actual"], data["episode"]
    print(
        f"{len(actual)} moves on {len(np.unique(episode))} inputs; {np.mean(actual < 0):.1%} lower the KL; "
        f"the best of each input's moves: {np.mean([actual[episode == e].min() for e in np.unique(episode)]):+.4f}"
    )
    print("| predictor (out of sample) | Spearman within input | helpful among its best quarter "
          "| log KL change of its best move per input | inputs where that move helps |")  # fmt: skip
    print("|---|---|---|---|---|")
    print(summary("additive model of the Eq. S profile", data["additive"], actual, episode))
    for ridge in RIDGES:
        predicted = held_out_predictions(data["features"], actual, episode, functools.partial(ridge_fit, ridge=ridge))
        print(summary(f"ridge on the move's features (penalty {ridge:g})", predicted, actual, episode))
    predicted = held_out_predictions(data["features"], actual, episode, mlp_fit)
    print(summary("a small network on the move's features (32 tanh units)", predicted, actual, episode))
    both = np.concatenate([data["features"], data["interaction"]], axis=1)
    for ridge in RIDGES:
        predicted = held_out_predictions(both, actual, episode, functools.partial(ridge_fit, ridge=ridge))
        print(
            summary(
                f"ridge, plus the residual stream's drift under the plan (penalty {ridge:g})",
                predicted,
                actual,
                episode,
            )
        )
    predicted = held_out_predictions(both, actual, episode, mlp_fit)
    print(summary("the small network, plus the residual stream's drift", predicted, actual, episode))
    print(summary("hindsight: the real changes (no policy can)", actual, actual, episode))


if __name__ == "__main__":
    main()
