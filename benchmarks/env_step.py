"""What an env step of DRRL-Attention-v0 costs against its floor, per reward and guardrail setting.

The floor of a step, as it really is: one layer of the model (a step runs one layer of the
forward pass; timed as the plain model's forward over the same batch divided by the number of
layers, full attention included) plus the layer's low-rank attention (timed on the step's
captured Q, K, V, spectra included). The kl reward needs a full-rank reference pass over the
batch (one more layer per step, done in ``reset``), so its floor is two layers plus the
low-rank attention; and it needs both passes' logits at every position, so a second floor adds a step's share
of the LM head over every position, twice. Target (issue 10): at most 1.3x the floor.

Measured in one run on the same batches, per setting, with the whole episode timed (``reset``
included, so the reference pass is counted) and divided by its steps; plus where a step's time
goes (cProfile of the same episodes run again, cumulative seconds per part: the timing runs unprofiled; the
forward pass's own layers are what the parts leave, as cProfile does not follow its greenlet).

Then the native vector env against the same number of single envs (issue 38: at least their steps/s): ``N``
episodes of one setting (the kl reward, exact guardrail, budget 0.625, one rank per layer) run one after another
in N single envs, and as one ``DRRL-Attention-v0`` vector env (``gym.make_vec``: one batched forward pass), same
seeds and fixed action; steps/s count episode steps (each over ``batch-size`` sequences), and the floor is the
plain model's forward over the stacked batch divided by its layers, twice (the reference pass).

    python benchmarks/env_step.py [--seq-len 256] [--batch-size 2] [--episodes 3] [--device cpu] [--num-envs 8]
                                  [--vector-only]
"""

from __future__ import annotations

import cProfile
import pstats
import time

import gymnasium as gym
import numpy as np
import torch
from _common import env_benchmark_parser

from drrl_env.attention.lowrank import low_rank_attention

SETTINGS = {  # label: env arguments
    "paper MDP: eq13, eq9 guardrail, no budget": dict(flops_budget=None, reward="eq13", guardrail="eq9", eps0=0.5),
    "eq13, no guardrail, no budget": dict(flops_budget=None, reward="eq13", guardrail="off"),
    "kl reward, exact guardrail, budget 0.625": dict(guardrail="exact", kl_shaping_weight=1.0),
    "kl reward, Eq. S profile, completion credit (the fixed action leaves the plan: a forward per step)": dict(
        sensitivity_samples=16, sensitivity_estimate="scaled_delta", kl_baseline="waterfill", kl_credit="completion"
    ),
}
PARTS = {  # label: (file, function) as cProfile names them
    "reference pass (kl reward, in reset)": ("episode.py", "run"),
    "full attention (fidelity term)": ("hook.py", "full"),
    "low-rank attention (spectra + projections + SDPA)": ("hook.py", "low_rank"),
    "exact guardrail errors": ("guardrail.py", "truncation_errors"),
    "spectra (Gram + eigh, on first use) and Eq. 9 energies": ("guardrail.py", "transition_energies"),
    "observation (conv, NER)": ("env.py", "_observation"),
    "KL and LM losses at the end": ("episode.py", "_finish"),
}


VECTOR_SETTING = dict(guardrail="exact", kl_shaping_weight=1.0)
"""the setting of the single-vs-vector comparison, on DRRL-Attention-PerLayer-v0 (one rank per layer, no signal)"""


def main() -> None:
    parser = env_benchmark_parser(__doc__, episodes=3)
    parser.add_argument("--num-envs", type=int, default=8, help="episodes of the single-vs-vector comparison")
    parser.add_argument("--vector-only", action="store_true", help="only the single-vs-vector comparison")
    args = parser.parse_args()
    common = dict(seq_len=args.seq_len, batch_size=args.batch_size, spectral_mode=args.mode, device=args.device)
    if not args.vector_only:
        profile_settings(args, common)
    compare_vector(args, common)


def compare_vector(args, common: dict) -> None:
    """N single envs one after another against one vector env of N, same seeds and fixed action, side by side."""
    kwargs = {**common, **VECTOR_SETTING}
    n, action = args.num_envs, 2
    singles = [gym.make("DRRL-Attention-PerLayer-v0", **kwargs).unwrapped for _ in range(n)]
    vector = gym.make_vec("DRRL-Attention-PerLayer-v0", num_envs=n, vectorization_mode="vector_entry_point", **kwargs)
    sync = torch.cuda.synchronize if singles[0].device.type == "cuda" else (lambda: None)
    length = singles[0].num_layers * singles[0].num_segments

    def run_singles(seed: int) -> None:
        for i, env in enumerate(singles):
            _episode(env, seed + i, action)

    def run_vector(seed: int) -> None:
        vector.reset(seed=seed)
        for _ in range(length):
            vector.step(np.full(n, action))

    seconds = {}
    for label, run in (("single envs, one after another", run_singles), ("vector env", run_vector)):
        run(100)  # warm-up
        sync()
        start = time.perf_counter()
        for episode in range(args.episodes):
            run(1000 * episode)
        sync()
        seconds[label] = time.perf_counter() - start
    stacked = torch.cat([env._episode.batch for env in vector.envs])  # noqa: SLF001 - the last episodes' batches
    layer_seconds, head_seconds = [], []
    for _ in range(3):
        layer_seconds.append(_forward_seconds(singles[0], stacked, all_logits=False, sync=sync) / length)
        head_seconds.append(_forward_seconds(singles[0], stacked, all_logits=True, sync=sync) / length)
    floor_ms = 2 * 1e3 * float(np.median(layer_seconds))  # the step's layer and the reference pass's
    head_floor_ms = 2 * 1e3 * float(np.median(head_seconds))  # the same with the LM head over every position
    steps = args.episodes * length * n
    device = (
        torch.cuda.get_device_name() if singles[0].device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"\n## single envs against the vector env (N = {n})\n{device}; torch {torch.__version__}; SmolLM2-135M; "
        f"B={args.batch_size} n={args.seq_len} mode={args.mode}; {args.episodes} x {n} episodes of {length} steps; "
        f"kl reward, exact guardrail, budget 0.625"
    )
    print(
        f"floor of a vector step (N episodes' layer, twice): {floor_ms:.2f} ms; with the LM head over every "
        f"position: {head_floor_ms:.2f} ms"
    )
    for label, total in seconds.items():
        per_vector_step_ms = 1e3 * total / (args.episodes * length)
        print(
            f"  {label:<32} {steps / total:8.1f} env steps/s  {steps * args.batch_size / total:8.1f} sequence-steps/s"
            f"  {per_vector_step_ms:8.2f} ms per N steps (ratio to the floor {per_vector_step_ms / floor_ms:.2f}; "
            f"with the head {per_vector_step_ms / head_floor_ms:.2f})"
        )
    single, batched = seconds.values()
    print(f"vector / single steps/s: {single / batched:.2f}x")
    vector.close()
    for env in singles:
        env.close()


def profile_settings(args, common: dict) -> None:
    """Each setting's step against its floor, and where its time goes."""
    action = 2  # rank 32, or the nearest the masks allow
    for label, overrides in SETTINGS.items():
        env = gym.make("DRRL-Attention-PerLayer-v0", **common, **overrides).unwrapped  # one rank per layer
        sync = torch.cuda.synchronize if env.device.type == "cuda" else (lambda: None)
        run = lambda seed: _episode(env, seed, action)  # noqa: E731
        run(100)  # warm-up
        profiler = cProfile.Profile()
        episode_seconds, steps, low_rank_seconds, layer_seconds, head_seconds = [], 0, [], [], []
        for episode in range(args.episodes):
            sync()
            start = time.perf_counter()
            calls = run(episode)  # timed without the profiler, which slows Python-heavy steps
            sync()
            episode_seconds.append(time.perf_counter() - start)
            profiler.enable()
            run(episode)  # the same episode again, profiled: where its time goes
            profiler.disable()
            steps += len(calls)
            for call, rank in calls:  # fresh spectra: no cached decompositions
                sync()
                start = time.perf_counter()
                low_rank_attention(call.query, call.key, call.value, rank, args.mode, call.scale, call.mask)
                sync()
                low_rank_seconds.append(time.perf_counter() - start)
            batch = env._episode.batch  # noqa: SLF001 - the same batch, through the plain model
            layer_seconds.append(_forward_seconds(env, batch, all_logits=False, sync=sync) / len(calls))
            if env.needs_reference:  # only a reward on the logits needs the LM head over every position
                head_seconds.append(_forward_seconds(env, batch, all_logits=True, sync=sync) / len(calls))
        step_ms = 1e3 * sum(episode_seconds) / steps
        layer_ms, low_ms = 1e3 * np.median(layer_seconds), 1e3 * np.median(low_rank_seconds)
        layers = 2 if env.config.reward_kind == "kl" else 1
        floor_ms = layers * layer_ms + low_ms
        device = (
            torch.cuda.get_device_name() if env.device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        )
        shape = f"B={args.batch_size} n={args.seq_len} mode={args.mode}"
        print(f"\n## {label}\n{device}; SmolLM2-135M; {shape}; {steps} steps")
        print(
            f"per step (reset included): {step_ms:.2f} ms; floor {layers} layer(s) x {layer_ms:.2f} ms + low-rank "
            f"attention {low_ms:.2f} ms = {floor_ms:.2f} ms; ratio {step_ms / floor_ms:.2f} (target <= 1.3); "
            f"steps/s {1e3 / step_ms:.1f}"
        )
        if head_seconds:  # the reward needs the (B, n, V) logits of both passes: the head is unavoidable
            head_ms = 1e3 * np.median(head_seconds) - layer_ms  # a step's share of the LM head over every position
            with_head = floor_ms + layers * head_ms
            print(
                f"floor with the LM head over every position (both passes, {head_ms:.2f} ms a step each): "
                f"{with_head:.2f} ms; ratio {step_ms / with_head:.2f}"
            )
        stats = pstats.Stats(profiler)
        total = stats.total_tt
        print(f"where the time goes (cProfile, share of the profiled episodes' {total:.2f} s):")
        parts = 0.0
        for part, (filename, function) in PARTS.items():
            seconds = sum(e[3] for key, e in stats.stats.items() if key[0].endswith(filename) and key[2] == function)
            parts += seconds
            if seconds:
                print(f"  {part:<58} {seconds:7.2f} s  {seconds / total:6.1%}")
        rest = total - parts  # cProfile cannot follow the forward's greenlet: its time is what the parts leave
        print(f"  {'the rest: layers between attention calls, LM head, Python':<58} {rest:7.2f} s  {rest / total:6.1%}")
        env.close()


def _forward_seconds(env, batch: torch.Tensor, all_logits: bool, sync) -> float:
    """Seconds of the plain model's forward over ``batch``: the last position's logits, or every position's."""
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        env.loaded.model(input_ids=batch, logits_to_keep=0 if all_logits else 1)
    sync()
    return time.perf_counter() - start


def _episode(env, seed: int, action: int) -> list:
    """Run one episode at ``action`` (or the nearest allowed); return each step's call and executed rank."""
    env.reset(seed=seed)
    calls, terminated = [], False
    while not terminated:
        call = env.attention_call
        _, _, terminated, _, info = env.step(action)
        calls.append((call, info["rank"]))
    return calls


if __name__ == "__main__":
    main()
