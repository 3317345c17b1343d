"""Cost of a greedy-oracle step against K env steps (issue 5 target: at most 0.5 * K env steps).

Measured in one run on the same seeded episodes: the wall time of an env step with a fixed
action, and of an oracle step (all K candidates scored in one batched pass, then the step).
Both are averaged over whole episodes after a warm-up episode.

    python benchmarks/oracle_step.py [--seq-len 256] [--batch-size 2] [--episodes 2] [--mode separate]
"""

from __future__ import annotations

import time

import gymnasium as gym
import numpy as np
from _common import benchmark_env, env_benchmark_parser

from oracle import GreedyOracle


def seconds_per_step(env: gym.Env, act, episodes: int, sync) -> float:
    times = []
    for episode in range(episodes + 1):  # episode 0 warms up
        obs, _ = env.reset(seed=episode)
        terminated = False
        while not terminated:
            sync()
            start = time.perf_counter()
            obs, _, terminated, _, _ = env.step(act(obs, env.unwrapped.action_masks()))
            sync()
            if episode:
                times.append(time.perf_counter() - start)
    return float(np.mean(times))


def main() -> None:
    args = env_benchmark_parser(__doc__, episodes=2).parse_args()
    env, sync = benchmark_env(args)
    inner = env.unwrapped
    num_candidates = len(inner.config.ranks)
    oracle = GreedyOracle()
    env_step = seconds_per_step(env, lambda obs, mask: 2, args.episodes, sync)
    oracle_step = seconds_per_step(env, lambda obs, mask: oracle.act(obs, mask, inner), args.episodes, sync)
    print(f"model={inner.config.model} B={args.batch_size} n={args.seq_len} K={num_candidates} mode={args.mode}")
    print(f"env step      {1e3 * env_step:8.1f} ms")
    print(f"oracle step   {1e3 * oracle_step:8.1f} ms")
    print(f"oracle step / (K * env step) = {oracle_step / (num_candidates * env_step):.3f}  (target <= 0.5)")


if __name__ == "__main__":
    main()
