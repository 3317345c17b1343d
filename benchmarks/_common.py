"""What the env benchmarks share: their command-line options and the env they time."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import gymnasium as gym
import torch

import drrl_env  # noqa: F401  (registers the env)


def env_benchmark_parser(description: str, episodes: int) -> argparse.ArgumentParser:
    """Options of an env benchmark: sequence length, batch, timed episodes, spectral mode, device."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per episode")
    parser.add_argument("--episodes", type=int, default=episodes, help="timed episodes")
    parser.add_argument("--mode", default="separate", help="spectral mode")
    parser.add_argument("--device", default="cpu", help="torch device")
    return parser


def benchmark_env(args: argparse.Namespace) -> tuple[gym.Env, Callable[[], None]]:
    """DRRL-Attention-v0 on the default model and a device sync.

    One rank per layer, the paper's eq13 reward (which the oracle scores), no guardrail, budget or signal: every
    rank allowed.
    """
    env = gym.make(
        "DRRL-Attention-v0",
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        spectral_mode=args.mode,
        device=args.device,
        guardrail="off",
        flops_budget=None,
        reward="eq13",
        per_head=False,
        sensitivity_samples=0,
    )
    sync = torch.cuda.synchronize if env.unwrapped.device.type == "cuda" else (lambda: None)
    return env, sync
