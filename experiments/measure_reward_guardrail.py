"""Measurements behind two defaults of DRRL-Attention-v0: the kl reward's shaping potential and eps0.

1. Shaping potential: over random budgeted rank allocations, how well does the relative
   residual-stream deviation ``D`` at the last layer's input track the episode's final KL
   (Spearman and Pearson correlation, and the ratio KL / D)? Also the same for the sum of the
   steps' exact logit errors, a cheaper proxy that ignores how errors compound.
2. eps0: the distribution of the exact guardrail's relative logit error per candidate rank
   (all layers), and the share of candidates an ``eps0`` masks.

    python experiments/measure_reward_guardrail.py [--episodes 24] [--seq-len 256] [--batch-size 2]
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np
from scipy.stats import pearsonr, spearmanr

import drrl_env  # noqa: F401
from experiments.teacher_neighbourhood import add_model_options


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=24, help="random episodes per spectral mode")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per episode")
    parser.add_argument("--budget", type=float, nargs=2, default=(0.4, 0.9), help="budget range of the episodes")
    parser.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.7], help="eps0 to try")
    add_model_options(parser, seq_len=None)
    args = parser.parse_args(argv)
    for mode in ("separate", "joint"):
        env = gym.make(
            "DRRL-Attention-PerLayer-v0",
            kl_shaping_weight=1.0,  # the shaping potential is what this measures
            model=args.model,
            ranks=tuple(args.ranks),
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            spectral_mode=mode,
            flops_budget=tuple(args.budget),
            guardrail="exact",
            eps0=10.0,  # never masks: the errors of every candidate are recorded, the budget alone constrains
            device="cpu",
        ).unwrapped
        rng = np.random.default_rng(0)
        kls, last_deviation, error_sums, errors_by_rank = [], [], [], []
        for episode in range(args.episodes):
            env.reset(seed=episode)
            terminated, deviations, errors = False, [], []
            while not terminated:
                errors_by_rank.append(env.candidate_logit_errors())  # (K,)
                allowed = np.flatnonzero(env.action_masks())
                _, _, terminated, _, info = env.step(int(rng.choice(allowed)))
                deviations.append(info["deviation"])
                errors.append(info["logit_error"])
            kls.append(info["kl"])
            last_deviation.append(deviations[-2])  # D at the last layer's input
            error_sums.append(sum(errors))
        kls, last_deviation, error_sums = map(np.asarray, (kls, last_deviation, error_sums))
        errors_by_rank = np.asarray(errors_by_rank)  # (steps, K)
        print(f"\n## {mode} mode, SmolLM2-135M, {args.episodes} random episodes of {args.batch_size}x{args.seq_len}")
        print(f"KL: mean {kls.mean():.4f}, range {kls.min():.4f}..{kls.max():.4f}")
        for name, proxy in (("D at the last layer's input", last_deviation), ("sum of exact logit errors", error_sums)):
            rank_correlation, linear_correlation = spearmanr(proxy, kls).statistic, pearsonr(proxy, kls).statistic
            print(
                f"{name}: Spearman {rank_correlation:.3f}, Pearson {linear_correlation:.3f}, "
                f"median KL/proxy {np.median(kls / proxy):.3f}"
            )
        print("\n| rank | " + " | ".join(str(r) for r in env.config.ranks) + " |")
        print("|---|" + "---|" * len(env.config.ranks))
        for q in (10, 50, 90):
            row = np.percentile(errors_by_rank, q, axis=0)
            print(f"| error p{q} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
        print("\n| eps0 | share of candidates masked | ranks allowed at the median step |")
        print("|---|---|---|")
        for eps in args.eps:
            masked = errors_by_rank > eps
            masked[:, -1] = False
            smallest = [env.config.ranks[int(np.flatnonzero(~row)[0])] for row in masked]
            print(f"| {eps} | {masked.mean():.3f} | >= {int(np.median(smallest))} |")
        env.close()


if __name__ == "__main__":
    main()
