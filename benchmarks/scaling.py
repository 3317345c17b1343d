"""Training throughput of DRRL-Attention-v0 (env steps per second) as env processes are added: RLlib and SB3.

Side by side in one run, on the default model with train_agent.py's env defaults (1 x 128 tokens,
joint mode, budget 0.625, kl reward): RLlib PPO with action masking (agents.rllib) with 1 and 2
env runners (Ray actors, one CPU and so one torch thread each, the learner in this process), and
SB3's MaskablePPO (train_agent.py) over a SubprocVecEnv of 1 and 2 envs (spawned processes with
torch's default threads) and over the in-process DummyVecEnv train_agent.py uses by default.
Each setting trains one warm-up iteration first (processes started, the model loaded), then the
timed steps; steps/s counts env steps sampled and trained over wall-clock time, PPO updates
included. Issue 12's target on the 2-core CPU: >= 1.6x from 1 to 2 RLlib env runners.

    python benchmarks/scaling.py [--steps 600] [--out docs/results/scaling_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.algorithms import get_algorithm
from agents.networks import policy_setup
from agents.rllib import RLlibConfig, build_algorithm, steps_sampled
from agents.rllib import build_parser as rllib_parser
from agents.training import make_vec_env
from drrl_env.cli import dataclass_from_options, env_kwargs

ROLLOUT = 150
"""env steps per PPO iteration in every setting (5 episodes of the default model's 30 layers)"""


def rllib_steps_per_second(runners: int, steps: int, seed: int) -> tuple[float, dict[str, float]]:
    """RLlib PPO with ``runners`` env runners: steps/s over ``steps`` env steps after one warm-up iteration.

    Also RLlib's own timers, seconds per iteration: sampling (env runners) and the learner's update.
    """
    import ray

    args = rllib_parser().parse_args(
        ["--num-env-runners", str(runners), "--train-batch-size", str(ROLLOUT), "--seed", str(seed)]
    )
    ray.init(include_dashboard=False, configure_logging=False)
    try:
        algorithm = build_algorithm(dataclass_from_options(RLlibConfig, vars(args)), env_kwargs(vars(args)))
        algorithm.train()
        start_steps, started = steps_sampled(algorithm), time.perf_counter()
        sampling, learning = [], []
        while steps_sampled(algorithm) - start_steps < steps:
            timers = algorithm.train()["timers"]
            sampling.append(timers["env_runner_sampling_timer"])
            learning.append(timers["learner_update_timer"])
        rate = (steps_sampled(algorithm) - start_steps) / (time.perf_counter() - started)
        algorithm.stop()
    finally:
        ray.shutdown()
    return rate, {
        "sampling_s_per_iteration": float(np.mean(sampling)),
        "learner_s_per_iteration": float(np.mean(learning)),
    }


def sb3_steps_per_second(n_envs: int, vec: str, steps: int, seed: int) -> tuple[float, dict[str, float]]:
    """MaskablePPO over ``n_envs`` envs of a ``vec`` vector env: steps/s over ``steps`` after a warm-up rollout."""
    kwargs = env_kwargs(vars(rllib_parser().parse_args([])))  # the same env options as the RLlib settings
    env = make_vec_env(kwargs, policy_setup("mlp"), n_envs, seed, vec)
    n_steps = ROLLOUT // n_envs
    model = get_algorithm("maskable_ppo").make(env, policy_setup("mlp"), seed, None, n_steps=n_steps, batch_size=64)
    model.learn(n_steps * n_envs)
    started, done = time.perf_counter(), model.num_timesteps
    model.learn(steps, reset_num_timesteps=False)
    rate = (model.num_timesteps - done) / (time.perf_counter() - started)
    env.close()
    return rate, {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="timed env steps per setting")
    parser.add_argument("--seed", type=int, default=0, help="seed of the agents and episodes")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    settings = [
        ("RLlib PPO, env runners", 1, lambda: rllib_steps_per_second(1, args.steps, args.seed)),
        ("RLlib PPO, env runners", 2, lambda: rllib_steps_per_second(2, args.steps, args.seed)),
        ("SB3 MaskablePPO, SubprocVecEnv envs", 1, lambda: sb3_steps_per_second(1, "subproc", args.steps, args.seed)),
        ("SB3 MaskablePPO, SubprocVecEnv envs", 2, lambda: sb3_steps_per_second(2, "subproc", args.steps, args.seed)),
        ("SB3 MaskablePPO, DummyVecEnv", 1, lambda: sb3_steps_per_second(1, "sync", args.steps, args.seed)),
    ]  # fmt: skip
    for name, workers, measure in settings:
        rate, timers = measure()
        rows.append({"setting": name, "workers": workers, "steps_per_second": rate, **timers})
        print(f"{name} = {workers}: {rate:.2f} env steps/s {timers}", flush=True)
    for name in {row["setting"] for row in rows}:
        rates = {row["workers"]: row["steps_per_second"] for row in rows if row["setting"] == name}
        if 1 in rates and 2 in rates:
            print(f"{name}: 2 vs 1 = {rates[2] / rates[1]:.2f}x")
    print("\n| setting | workers | env steps/s | sampling s/iteration | learner s/iteration |\n|---|---|---|---|---|")
    for row in rows:
        timers = [
            f"{row[key]:.3f}" if key in row else "-" for key in ("sampling_s_per_iteration", "learner_s_per_iteration")
        ]
        print(f"| {row['setting']} | {row['workers']} | {row['steps_per_second']:.2f} | {' | '.join(timers)} |")
    if args.out:
        machine = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
        args.out.write_text(json.dumps({"machine": machine, "timed_steps": args.steps, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
