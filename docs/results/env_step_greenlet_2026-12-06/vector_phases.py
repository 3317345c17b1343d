import time, numpy as np, gymnasium as gym, torch
import drrl_env
kw = dict(seq_len=256, batch_size=2, guardrail="exact", kl_shaping_weight=1.0)
n = 8
singles = [gym.make("DRRL-Attention-PerLayer-v0", **kw).unwrapped for _ in range(n)]
vec = gym.make_vec("DRRL-Attention-PerLayer-v0", num_envs=n, vectorization_mode="vector_entry_point", **kw)
L = singles[0].num_layers
def phases_single(seed):
    r = m = l = 0.0
    for i, env in enumerate(singles):
        t = time.perf_counter(); env.reset(seed=seed + i); r += time.perf_counter() - t
        for s in range(L):
            t = time.perf_counter(); env.step(2); d = time.perf_counter() - t
            if s == L - 1: l += d
            else: m += d
    return r, m, l
def phases_vec(seed):
    t = time.perf_counter(); vec.reset(seed=seed); r = time.perf_counter() - t
    m = l = 0.0
    for s in range(L):
        t = time.perf_counter(); vec.step(np.full(n, 2)); d = time.perf_counter() - t
        if s == L - 1: l += d
        else: m += d
    return r, m, l
for f in (phases_single, phases_vec): f(100)
for rep in range(2):
    for name, f in (("single", phases_single), ("vector", phases_vec)):
        r, m, l = f(1000 * rep)
        print(f"{name}: reset {r:.2f} s, middle steps {m:.2f} s, last step {l:.2f} s, total {r+m+l:.2f}")
