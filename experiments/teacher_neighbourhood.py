"""How much room does the Eq. S teacher leave next to its own allocation? Budget-neutral swaps, scored exactly.

For each of ``--episodes`` batches of the per-head Eq. S env (``--split``, 1 x 128 tokens, ``--mode``, budget
``--budget``), the teacher's allocation (``hindsight:scaled_delta``: the plan a behaviour-cloned agent copies) is
scored by its KL to the full model on that batch, and so are ``--swaps`` random budget-neutral moves from it (one
key/value group of one layer one candidate down, another group one candidate up: the same logit FLOPs, since the
candidates are evenly spaced) and ``--rounds`` rounds of greedy hill-climbing on those moves. It prints, per batch,
uniform ranks' KL, the teacher's, the share of moves that lower it and the best move's gain, and the climb's end:
the room that a policy starting on the teacher (BC) has for PPO to find by local changes; and whether the profile
the agent is shown ranks the moves (Spearman of the additive model's change against the KL's, and the share of
helpful moves among the quarter it predicts cheapest: the observation can point at the room only if these beat
chance). Label-free throughout (KL to the full model); nothing here is a policy, since every score reads the batch
it scores.

    python experiments/teacher_neighbourhood.py [--episodes 6] [--swaps 120] [--rounds 2] [--budget 0.625]
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np
import torch
from scipy.stats import spearmanr

import drrl_env  # noqa: F401  (registers the env)
from drrl_env import ENV_ID
from drrl_env.config import DEFAULT_RANKS
from drrl_env.env import DRRLAttentionEnv
from drrl_env.lm.models import DEFAULT_MODEL
from drrl_env.lm.scoring import replay_scores
from drrl_env.profiles.waterfill import rank_shares
from oracle.hindsight import HindsightOracle


def add_batch_options(parser: argparse.ArgumentParser, episodes: int) -> None:
    """The options that pick the batches and the env: --episodes, --budget, --mode, --split, --seed."""
    parser.add_argument("--episodes", type=int, default=episodes, help="batches (episode seeds seed .. seed + n - 1)")
    parser.add_argument("--budget", type=float, default=0.625, help="logit-FLOPs share of full attention")
    parser.add_argument("--mode", default="joint", help="spectral mode")
    parser.add_argument("--split", default="validation", help="corpus split of the batches")
    parser.add_argument("--seed", type=int, default=20_000, help="first episode seed")
    parser.add_argument("--samples", type=int, default=16, help="label samples of the Eq. S scale's fit")
    add_model_options(parser)


def add_model_options(parser: argparse.ArgumentParser, seq_len: int | None = 128) -> None:
    """--model, --ranks and (unless ``seq_len`` is None) --seq-len: what the experiments' smoke tests shrink."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="causal LM (default: the offline default)")
    parser.add_argument("--ranks", type=int, nargs="+", default=list(DEFAULT_RANKS), help="candidate ranks")
    if seq_len is not None:
        parser.add_argument("--seq-len", type=int, default=seq_len, help="tokens per sequence")


def eq_s_env(args: argparse.Namespace) -> DRRLAttentionEnv:
    """The README main command's env (per head, Eq. S with 16 samples, 1 x 128, no guardrail) at ``args``' options."""
    kwargs = dict(
        per_head=True, sensitivity_samples=args.samples, sensitivity_estimate="scaled_delta", flops_budget=args.budget,
        seq_len=args.seq_len, batch_size=1, spectral_mode=args.mode, guardrail="off", split=args.split,
        model=args.model, ranks=tuple(args.ranks),
    )  # fmt: skip
    return gym.make(ENV_ID, **kwargs).unwrapped


def group_ranks(env: DRRLAttentionEnv, indices: np.ndarray) -> tuple[torch.Tensor, ...]:
    """The ``LayerRanksHandler`` ranks of candidate ``indices`` ``(L, Hkv)``: a tensor per layer."""
    return tuple(torch.as_tensor(np.asarray(env.config.ranks)[indices]))


def allocation_kl(env: DRRLAttentionEnv, indices: np.ndarray, full_logits: torch.Tensor) -> float:
    """KL from the full model of the env's current batch with group ranks ``ranks[indices]`` ``(L, Hkv)``."""
    cfg = env.config
    return replay_scores(
        env.loaded, env.input_ids, group_ranks(env, indices), cfg.spectral_mode, full_logits, cfg.segment_len
    )[0]


def neutral_moves(
    indices: np.ndarray, num_candidates: int, count: int, rng: np.random.Generator
) -> list[tuple[int, int]]:
    """Up to ``count`` distinct (down, up) pairs of flat group positions: one candidate lower, another one higher."""
    flat = indices.reshape(-1)
    lower, raise_ = np.flatnonzero(flat > 0), np.flatnonzero(flat < num_candidates - 1)
    pairs = [(int(a), int(b)) for a in lower for b in raise_ if a != b]
    chosen = rng.choice(len(pairs), size=min(count, len(pairs)), replace=False)
    return [pairs[i] for i in chosen]


def moved(indices: np.ndarray, move: tuple[int, int], num_candidates: int) -> np.ndarray | None:
    """``indices`` with ``move`` applied, or None where the raised group is already at the largest candidate."""
    flat = indices.reshape(-1).copy()
    down, up = move
    if flat[down] == 0 or flat[up] == num_candidates - 1:
        return None
    flat[down] -= 1
    flat[up] += 1
    return flat.reshape(indices.shape)


def additive_change(cost: np.ndarray, indices: np.ndarray, candidate: np.ndarray) -> float:
    """The additive model's change: the summed ``(units, K)`` profile ``cost`` at ``candidate`` minus at ``indices``."""
    rows = np.arange(cost.shape[0])
    return float(cost[rows, candidate.reshape(-1)].sum() - cost[rows, indices.reshape(-1)].sum())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_options(parser, episodes=6)
    parser.add_argument("--swaps", type=int, default=120, help="random budget-neutral moves scored per round")
    parser.add_argument("--rounds", type=int, default=2, help="greedy rounds: take the best move, draw moves again")
    args = parser.parse_args(argv)
    env = eq_s_env(args)
    shares = rank_shares(env.config.ranks, env.head_dim)
    if not np.allclose(np.diff(shares), shares[1] - shares[0]):
        raise SystemExit(f"the candidates {env.config.ranks} are not evenly spaced: a swap would change the FLOPs")
    num_candidates, rng = len(env.config.ranks), np.random.default_rng(args.seed)
    teacher = HindsightOracle("scaled_delta", 16)
    print(
        f"{args.split} batches, 1 x 128, {args.mode}, budget {args.budget}, {args.swaps} moves x {args.rounds} rounds"
    )
    print(
        "| seed | uniform KL | teacher KL | moves that lower it | best move | after the climb | climb gain "
        "| Spearman(profile's change, KL's change) | moves that help among the profile's cheapest quarter |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    gains, shares_better, agreement = [], [], []
    for episode in range(args.episodes):
        env.reset(seed=args.seed + episode)
        with torch.no_grad():
            full_logits = env.loaded.model(input_ids=env.input_ids).logits
        uniform_rank = env._episode.budget.uniform_rank()
        uniform_indices = np.full((env.num_layers, env.kv_heads), env.config.ranks.index(uniform_rank))
        uniform = allocation_kl(env, uniform_indices, full_logits)
        current = np.asarray(teacher.allocate(env))
        teacher_kl = best_kl = allocation_kl(env, current, full_logits)
        cost = teacher.last_profile.reshape(-1, num_candidates)  # what the observation shows, per group
        first_best = None
        for round_index in range(args.rounds):
            scored, predicted = [], []
            for move in neutral_moves(current, num_candidates, args.swaps, rng):
                candidate = moved(current, move, num_candidates)
                if candidate is not None:
                    scored.append((allocation_kl(env, candidate, full_logits), candidate))
                    predicted.append(additive_change(cost, current, candidate))
            if round_index == 0:
                actual = np.array([kl - teacher_kl for kl, _ in scored])
                shares_better.append(np.mean(actual < 0))
                first_best = teacher_kl + actual.min()
                cheapest = np.argsort(predicted)[: max(1, len(predicted) // 4)]
                agreement.append((spearmanr(predicted, actual)[0], np.mean(actual[cheapest] < 0)))
            kl, candidate = min(scored, key=lambda item: item[0])
            if kl >= best_kl:
                break
            best_kl, current = kl, candidate
        gains.append(1 - best_kl / teacher_kl)
        print(
            f"| {args.seed + episode} | {uniform:.5f} | {teacher_kl:.5f} | {shares_better[-1]:.0%} | "
            f"{first_best:.5f} ({1 - first_best / teacher_kl:+.1%}) | {best_kl:.5f} | {gains[-1]:.1%} | "
            f"{agreement[-1][0]:.2f} | {agreement[-1][1]:.0%} |",
            flush=True,
        )
    rho, cheap = np.mean(agreement, axis=0)
    print(
        f"mean share of moves that help {np.mean(shares_better):.1%}; mean climb gain {np.mean(gains):.1%}; "
        f"mean Spearman {rho:.2f}; helpful among the profile's cheapest quarter {cheap:.1%}"
    )


if __name__ == "__main__":
    main()
