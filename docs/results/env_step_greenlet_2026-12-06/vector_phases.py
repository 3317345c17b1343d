"""N = 8 single envs against the vector env, phase by phase: reset, middle steps, last step (2026-12-06).

DRRL-Attention-PerLayer-v0, B = 2, n = 256, kl reward, exact guardrail, budget 0.625, fixed action; rounds of 8
episodes each, single envs and the vector env interleaved.
"""

import time

import gymnasium as gym
import numpy as np

import drrl_env  # noqa: F401 - registers the ids

KWARGS = dict(seq_len=256, batch_size=2, guardrail="exact", kl_shaping_weight=1.0)
N, ACTION, ROUNDS = 8, 2, 4
singles = [gym.make("DRRL-Attention-PerLayer-v0", **KWARGS).unwrapped for _ in range(N)]
vector = gym.make_vec("DRRL-Attention-PerLayer-v0", num_envs=N, vectorization_mode="vector_entry_point", **KWARGS)
LENGTH = singles[0].num_layers


def timed(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def single_phases(seed: int) -> tuple[float, float, float]:
    reset = middle = last = 0.0
    for i, env in enumerate(singles):
        reset += timed(lambda e=env, s=seed + i: e.reset(seed=s))
        for step in range(LENGTH):
            seconds = timed(env.step, ACTION)
            last, middle = (last + seconds, middle) if step == LENGTH - 1 else (last, middle + seconds)
    return reset, middle, last


def vector_phases(seed: int) -> tuple[float, float, float]:
    reset, middle, last = timed(lambda: vector.reset(seed=seed)), 0.0, 0.0
    for step in range(LENGTH):
        seconds = timed(vector.step, np.full(N, ACTION))
        last, middle = (last + seconds, middle) if step == LENGTH - 1 else (last, middle + seconds)
    return reset, middle, last


single_phases(100)
vector_phases(100)
for round_index in range(ROUNDS):
    for name, phases in (("single", single_phases), ("vector", vector_phases)):
        reset, middle, last = phases(1000 * round_index)
        total = reset + middle + last
        print(f"{name}: reset {reset:.2f} s, middle steps {middle:.2f} s, last step {last:.2f} s, total {total:.2f}")
