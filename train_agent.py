"""Train a MaskablePPO agent on DRRL-Attention-v0, then compare it with fixed ranks on held-out text.

    python train_agent.py [--total-timesteps 1500] [--seed 0] [env options]   (--help lists all)

The comparison runs every policy over the same seeded episodes of the test split: each episode is
one forward pass of the LM over a batch with the policy's ranks really in place, so the LM loss
and perplexity are measured, not estimated. Attention FLOPs are ``drrl_env.flops`` (overheads
included), relative to full attention.

The agent zoo, BC warm start, checkpoints/resume and the full evaluation are the subject of later
issues; this command is the first end-to-end path.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np

import drrl_env
from drrl_env.env import DEFAULT_RANKS, EnvConfig


@dataclass
class EpisodeSummary:
    """Means over evaluation episodes of one policy."""

    name: str
    rank: float
    flops_ratio: float
    fidelity: float
    lm_loss: float
    reward: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.lm_loss)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total-timesteps", type=int, default=1500, help="environment steps of PPO training")
    parser.add_argument("--seed", type=int, default=0, help="seed of the agent and of the episodes")
    parser.add_argument("--n-steps", type=int, default=150, help="PPO rollout length per update")
    parser.add_argument("--eval-episodes", type=int, default=4, help="test-split episodes per compared policy")
    parser.add_argument("--logdir", default="runs", help="TensorBoard logs and the saved model go under this folder")
    defaults = EnvConfig()
    parser.add_argument("--model", default=defaults.model, help="causal LM: offline default, local folder or hub id")
    parser.add_argument("--corpus", default=defaults.corpus, help="corpus of the episodes (train split for training)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per episode")
    parser.add_argument("--segment-len", type=int, default=None, help="queries per segment (default: whole sequence)")
    parser.add_argument("--ranks", type=int, nargs="+", default=list(DEFAULT_RANKS), help="candidate ranks")
    parser.add_argument("--spectral-mode", choices=drrl_env.SPECTRAL_MODES, default="separate", help="spectral mode")
    parser.add_argument("--alpha", type=float, default=defaults.alpha, help="fidelity weight (Eq. 13)")
    parser.add_argument("--beta", type=float, default=defaults.beta, help="FLOPs weight (Eq. 13)")
    parser.add_argument("--gamma", type=float, default=defaults.gamma, help="perturbation weight (Eq. 13)")
    parser.add_argument("--eps0", type=float, default=defaults.eps0, help="initial guardrail threshold (Eq. 11)")
    parser.add_argument("--eps-decay", type=float, default=defaults.eps_decay, help="guardrail decay per step")
    parser.add_argument("--no-guardrail", action="store_true", help="disable the action mask (ablation)")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu' or 'cuda'")
    return parser


def env_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        model=args.model,
        corpus=args.corpus,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        segment_len=args.segment_len,
        ranks=tuple(args.ranks),
        spectral_mode=args.spectral_mode,
        alpha=args.alpha,
        beta=args.beta,
        gamma=args.gamma,
        eps0=args.eps0,
        eps_decay=args.eps_decay,
        guardrail=not args.no_guardrail,
        device=args.device,
    )


def evaluate(name: str, choose, kwargs: dict, episodes: int, seed: int) -> EpisodeSummary:
    """Run ``choose(obs, mask) -> action`` over ``episodes`` seeded test-split episodes."""
    env = gym.make("DRRL-Attention-v0", **{**kwargs, "split": "test", "terminal_lm_weight": 1.0})
    ranks, flops, flops_full, fidelity, losses, rewards = [], 0.0, 0.0, [], [], []
    for episode in range(episodes):
        obs, info = env.reset(seed=seed + episode)
        terminated = False
        while not terminated:
            obs, reward, terminated, _, info = env.step(choose(obs, env.unwrapped.action_masks()))
            ranks.append(np.mean(info["rank"]))
            flops, flops_full = flops + info["flops"], flops_full + info["flops_full"]
            fidelity.append(info["fidelity"])
            rewards.append(reward)
        losses.append(info["lm_loss"])
    env.close()
    return EpisodeSummary(
        name,
        float(np.mean(ranks)),
        flops / flops_full,
        float(np.mean(fidelity)),
        float(np.mean(losses)),
        float(np.sum(rewards) / episodes),
    )


def main(argv: list[str] | None = None) -> int:
    from sb3_contrib import MaskablePPO

    args = build_parser().parse_args(argv)
    kwargs = env_kwargs(args)
    run_name = f"DRRL-Attention-v0__maskable_ppo__{args.seed}__{int(time.time())}"
    env = gym.make("DRRL-Attention-v0", **kwargs)
    agent = MaskablePPO(
        "MlpPolicy",
        env,
        n_steps=args.n_steps,
        batch_size=min(64, args.n_steps),
        seed=args.seed,
        tensorboard_log=args.logdir,
        verbose=0,
        device="cpu",
    )
    agent.learn(args.total_timesteps, tb_log_name=run_name, progress_bar=True)
    path = Path(args.logdir) / f"{run_name}.zip"
    agent.save(path)
    print(f"saved {path}")

    ranks = sorted(args.ranks)
    fixed32 = ranks.index(min(ranks, key=lambda r: abs(r - 32)))
    policies = {
        "full rank (largest candidate)": lambda obs, mask: len(ranks) - 1,
        f"fixed r={ranks[fixed32]}": lambda obs, mask: fixed32,
        "MaskablePPO (this run)": lambda obs, mask: int(agent.predict(obs, action_masks=mask, deterministic=True)[0]),
    }
    rows = [evaluate(name, choose, kwargs, args.eval_episodes, 10_000) for name, choose in policies.items()]
    print(
        f"\ntest split, {args.eval_episodes} episodes of {args.batch_size}x{args.seq_len} tokens, "
        f"mode={args.spectral_mode}, guardrail={'off' if args.no_guardrail else 'on'}"
    )
    print(f"{'policy':<30} {'mean rank':>9} {'FLOPs':>6} {'fidelity':>8} {'PPL':>8} {'return':>8}")
    for row in rows:
        print(
            f"{row.name:<30} {row.rank:>9.1f} {row.flops_ratio:>6.3f} {row.fidelity:>8.4f} "
            f"{row.perplexity:>8.2f} {row.reward:>8.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
