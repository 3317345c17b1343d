"""What an episode of DRRL-KVCache-v0 costs: the prompt's one-off state, then episodes on a kept prompt.

Issue 37's target on the CPU at context 1024: at least 5 episodes per second of rank decisions and scoring once the
prompt's state is kept. Prints the first reset (the precomputation: the observed and scored tokens' generation,
one prefill per candidate rank, the observation's statistics), then episodes on the same prompt with random
allowed ranks, and the observation's FLOPs beside the scored generation's (the full model's forward FLOPs of the
``horizon`` tokens, ``2 x parameters`` per token).

    python benchmarks/kvcache_env.py [--context 1024] [--episodes 20] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np
import torch

import drrl_env  # noqa: F401  (registers the env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens")
    parser.add_argument("--episodes", type=int, default=20, help="timed episodes on the kept prompt")
    parser.add_argument("--device", default="cpu", help="torch device")
    args = parser.parse_args()
    env = gym.make("DRRL-KVCache-v0", context=args.context, device=args.device).unwrapped
    sync = torch.cuda.synchronize if env.device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    _, info = env.reset(seed=0, options={"prompt": 0})
    sync()
    first = time.perf_counter() - start
    rng = np.random.default_rng(0)
    kls, start = [], time.perf_counter()
    for _ in range(args.episodes):
        env.reset(options={"prompt": 0})
        terminated = False
        while not terminated:
            _, _, terminated, _, step_info = env.step(int(rng.choice(np.flatnonzero(env.action_masks()))))
        kls.append(step_info["kl"])
    sync()
    seconds = time.perf_counter() - start
    parameters = sum(p.numel() for p in env.loaded.model.parameters())
    generation_flops = 2 * parameters * env.config.horizon
    device = torch.cuda.get_device_name() if env.device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    cfg = env.config
    print(
        f"{device}; torch {torch.__version__}; SmolLM2-135M; context {cfg.context}, observe {cfg.observe_tokens}, "
        f"horizon {cfg.horizon}, ranks {list(cfg.ranks)}, key-cache budget {cfg.cache_budget}"
    )
    print(
        f"first reset (the prompt's state, once): {first:.1f} s, of which the observation's statistics "
        f"{info['seconds_observation']:.2f} s"
    )
    print(
        f"episodes on the kept prompt: {args.episodes / seconds:.2f} episodes/s (target >= 5), "
        f"{1e3 * seconds / args.episodes:.0f} ms each; mean KL per token {np.mean(kls):.4f} (random ranks)"
    )
    print(
        f"observation FLOPs {info['flops_observation']:.3g} against the scored generation's {generation_flops:.3g}: "
        f"{info['flops_observation'] / generation_flops:.2%}"
    )


if __name__ == "__main__":
    main()
