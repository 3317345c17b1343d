"""Does the Eq. S teacher have a systematic bias? Its water-fill over tilted profiles, scored exactly.

The hindsight teacher (``hindsight:scaled_delta``) water-fills each input's Eq. S profile, an additive model of
how each key/value group's rank adds KL. If that model were wrong the same way on every input (errors of early
layers compounding downstream, say), a correction independent of the input would lower the teacher's KL, and an
agent could learn it from few episodes. This script water-fills, on each of ``--episodes`` batches, the profile
tilted by depth (``P * exp(a * (depth - 1/2))``, depth 0 to 1 over the layers) and raised to a power
(``P ** g``: flatter or sharper), and prints each variant's mean KL to the full model and its log ratio to the
plain teacher's per batch (mean ± standard error, and on how many batches it is lower). Label-free (KL to the
full model); the plain teacher (``a = 0, g = 1``) is the reference.

    python experiments/teacher_tilt.py [--episodes 16] [--split validation] [--seed 20000]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from drrl_env.profiles.waterfill import rank_shares, waterfill_indices
from experiments.teacher_neighbourhood import add_batch_options, allocation_kl, eq_s_env

TILTS = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)
POWERS = (0.75, 1.25)


def tilted(profile: np.ndarray, tilt: float, power: float) -> np.ndarray:
    """The ``(L, Hkv, K)`` profile raised to ``power`` and scaled by ``exp(tilt * (depth - 1/2))`` per layer."""
    depth = np.linspace(0.0, 1.0, profile.shape[0]) - 0.5
    return np.maximum(profile, 0.0) ** power * np.exp(tilt * depth)[:, None, None]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_options(parser, episodes=16)
    args = parser.parse_args(argv)
    env = eq_s_env(args)
    shares = rank_shares(env.config.ranks, env.head_dim)
    variants = [(tilt, 1.0) for tilt in TILTS] + [(0.0, power) for power in POWERS]
    scores = np.zeros((args.episodes, len(variants)))
    for episode in range(args.episodes):
        env.reset(seed=args.seed + episode)
        with torch.no_grad():
            full_logits = env.loaded.model(input_ids=env.input_ids).logits
        for column, (tilt, power) in enumerate(variants):
            chosen = waterfill_indices(tilted(env.sensitivity_profile, tilt, power), shares, env.budget_share)
            scores[episode, column] = allocation_kl(env, np.asarray(chosen), full_logits)
        print(f"episode {episode + 1}/{args.episodes}", flush=True)
    reference = scores[:, variants.index((0.0, 1.0))]
    seeds = f"{args.seed}-{args.seed + args.episodes - 1}"
    print(f"{args.split} batches {seeds}, 1 x 128, {args.mode}, budget {args.budget}")
    print("| tilt a | power g | mean KL | log(KL / teacher's) per batch | lower on |")
    print("|---|---|---|---|---|")
    for column, (tilt, power) in enumerate(variants):
        ratio = np.log(scores[:, column] / reference)
        print(
            f"| {tilt:+.1f} | {power:.2f} | {scores[:, column].mean():.5f} | {ratio.mean():+.4f} ± "
            f"{ratio.std(ddof=1) / np.sqrt(len(ratio)):.4f} | {np.sum(ratio < -1e-12)} of {len(ratio)} |"
        )


if __name__ == "__main__":
    main()
