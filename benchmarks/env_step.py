"""Env steps per second of DRRL-Attention-v0, and what one step costs against its attention.

Target (issue 4): a step should cost at most 1.3x the layer's full attention plus one low-rank
attention. This prints, measured in one run on the same batch:

* steps/s over whole episodes (a fixed action);
* per step: the wall time, and the time of full + low-rank attention of that step's call
  (timed again on the captured Q, K, V, spectra included), and their ratio;
* where a step's time goes (cProfile, cumulative seconds per part).

    python benchmarks/env_step.py [--seq-len 256] [--batch-size 2] [--episodes 3] [--device cpu]
"""

from __future__ import annotations

import cProfile
import pstats
import time

import numpy as np
import torch
from _common import benchmark_env, env_benchmark_parser

from drrl_env.lowrank import full_attention, low_rank_attention

PARTS = {  # label: (file, function) as cProfile names them
    "rest of the layer (forward pass between attention calls)": ("runner.py", "send"),
    "full attention (for the fidelity term)": ("hook.py", "full"),
    "low-rank attention (spectra + projections + SDPA)": ("hook.py", "low_rank"),
    "guardrail energies (spectra, core SVD, Eq. 9)": ("guardrail.py", "transition_energies"),
    "observation (conv, NER)": ("env.py", "_observation"),
}


def main() -> None:
    args = env_benchmark_parser(__doc__, episodes=3).parse_args()
    env, sync = benchmark_env(args)
    inner = env.unwrapped
    action = 2  # rank 32
    env.reset(seed=0)
    for _ in range(inner.num_layers):  # warm-up episode
        env.step(action)
    step_times, attention_times = [], []
    profiler = cProfile.Profile()
    start_all = time.perf_counter()
    for episode in range(args.episodes):
        env.reset(seed=episode)
        terminated = False
        while not terminated:
            call = inner._call
            sync()
            start = time.perf_counter()
            profiler.enable()
            _, _, terminated, _, info = env.step(action)
            profiler.disable()
            sync()
            step_times.append(time.perf_counter() - start)
            start = time.perf_counter()  # fresh spectra: no cached decompositions of the step
            full_attention(call.query, call.key, call.value, call.scale, call.mask)
            low_rank_attention(call.query, call.key, call.value, info["rank"], args.mode, call.scale, call.mask)
            sync()
            attention_times.append(time.perf_counter() - start)
    total = time.perf_counter() - start_all - sum(attention_times)
    steps = len(step_times)
    device = torch.cuda.get_device_name() if inner.device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device}; SmolLM2-135M; B={args.batch_size} n={args.seq_len} mode={args.mode}; {steps} steps")
    print(f"steps/s (whole episodes, reset included): {steps / total:.1f}")
    step_ms, attn_ms = 1e3 * np.median(step_times), 1e3 * np.median(attention_times)
    print(
        f"median step: {step_ms:.2f} ms; full + low-rank attention of the same call: {attn_ms:.2f} ms; "
        f"ratio {step_ms / attn_ms:.2f} (target <= 1.3)"
    )
    stats = pstats.Stats(profiler)
    profiled = sum(entry[3] for key, entry in stats.stats.items() if key[2] == "step" and "env.py" in key[0])
    print(f"where a step's time goes (cProfile, share of env.step's {profiled:.2f} s):")
    for label, (filename, function) in PARTS.items():
        seconds = sum(
            entry[3] for key, entry in stats.stats.items() if key[0].endswith(filename) and key[2] == function
        )
        print(f"  {label:<58} {seconds:7.2f} s  {seconds / profiled:6.1%}")


if __name__ == "__main__":
    main()
