"""A residual agent: MaskablePPO choosing offsets from the static allocation, scored against it on the same batch.

The experiment behind docs/results.md's "residual agent" rows (issue 14, part 2). The env gets the
static allocation of the budget (``agents.static``, validation-profiled) as ``reference_ranks``;
``drrl_env.wrappers.RankOffsets`` makes the action an offset in candidate steps from it, so offset 0
everywhere replays static; the terminal reward is ``--kl-baseline`` (default ``reference_log_ratio``:
``log(KL_static / KL)`` on the episode's own batch, a paired comparison that removes how hard the
input is). The policy starts with ``--zero-bias`` added to the logit of offset 0 (2: offset 0 has
probability 0.65 with five offsets), so training starts at static and explores around it. After
training, the greedy policy, static and uniform run the same ``--episodes`` seeded episodes of
``--split`` (validation by default: the test split stays unseen) through ``agents.evaluate``.

    python scripts/residual_ppo.py [--total-timesteps 4500] [--budget 0.625] [--zero-bias 2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from sb3_contrib import MaskablePPO
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv

from agents.evaluate import evaluate_policy
from agents.train_config import TRAIN_ENV_DEFAULTS
from agents.zoo import make_policy
from drrl_env import ENV_ID
from drrl_env.cli import at_least
from drrl_env.env import DRRLAttentionEnv
from drrl_env.files import write_text_atomic
from drrl_env.wrappers import DEFAULT_OFFSETS, RankOffsets


class ResidualPolicy:
    """A policy trained on ``RankOffsets`` as a rank policy of the bare env (greedy, masked)."""

    def __init__(self, model: MaskablePPO, offsets: tuple[int, ...], reference: tuple[int, ...]) -> None:
        self.model, self.offsets, self.reference, self.name = model, offsets, reference, "residual_ppo"
        self._translators: dict[int, RankOffsets] = {}

    def reset(self, seed: int) -> None:
        del seed

    def act(self, observation: np.ndarray, action_mask: np.ndarray, env: DRRLAttentionEnv) -> int:
        translator = self._translators.get(id(env))
        if translator is None:
            translator = self._translators[id(env)] = RankOffsets(env, self.offsets, self.reference)
        offset, _ = self.model.predict(
            translator.observation(observation), action_masks=translator.action_masks(), deterministic=True
        )
        return translator.action(offset)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=0.625, help="logit-FLOPs budget of every episode")
    parser.add_argument("--total-timesteps", type=at_least(1), default=4500, help="PPO env steps")
    parser.add_argument("--offsets", type=int, nargs="+", default=list(DEFAULT_OFFSETS), help="candidate steps")
    parser.add_argument("--zero-bias", type=float, default=2.0, help="added to offset 0's initial logit")
    parser.add_argument(
        "--kl-baseline", choices=("reference", "reference_log_ratio"), default="reference_log_ratio", help="reward"
    )
    parser.add_argument("--learning-rate", type=float, default=3e-4, help="PPO learning rate")
    parser.add_argument("--n-steps", type=at_least(1), default=150, help="env steps per PPO update")
    parser.add_argument("--seed", type=int, default=0, help="PPO and training-episode seed")
    parser.add_argument("--episodes", type=at_least(1), default=10, help="evaluation episodes")
    parser.add_argument("--eval-seed", type=int, default=20000, help="evaluation episode i is seeded eval-seed + i")
    parser.add_argument("--split", default="validation", help="evaluation split (validation: test stays unseen)")
    parser.add_argument("--out", default=None, help="JSON file of the results (default: print only)")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    kwargs = {**TRAIN_ENV_DEFAULTS, "flops_budget": args.budget}
    static = make_policy(f"static:{args.budget:g}:fisher", kwargs)
    ranks = gym.make(ENV_ID, **kwargs).unwrapped.config.ranks
    reference = tuple(int(ranks[i]) for i in static.allocation(args.budget))
    offsets = tuple(args.offsets)
    train_kwargs = {**kwargs, "kl_baseline": args.kl_baseline, "reference_ranks": reference}
    venv = DummyVecEnv([lambda: Monitor(RankOffsets(gym.make(ENV_ID, **train_kwargs), offsets))])
    model = MaskablePPO("MlpPolicy", venv, n_steps=args.n_steps, batch_size=50, learning_rate=args.learning_rate,
                        seed=args.seed, policy_kwargs={"net_arch": [64, 64]}, verbose=0)  # fmt: skip
    with torch.no_grad():
        model.policy.action_net.bias[offsets.index(0)] += args.zero_bias
    start = time.time()
    model.learn(args.total_timesteps, progress_bar=True)
    train_seconds = time.time() - start
    results: dict[str, Any] = {"options": vars(args), "reference_ranks": list(reference), "train_s": train_seconds}
    for policy in (ResidualPolicy(model, offsets, reference), static, make_policy("uniform", kwargs)):
        row = evaluate_policy(policy, kwargs, args.episodes, args.eval_seed, timing_repeats=0, split=args.split)
        results[policy.name] = {"kl": row.kl, "ppl": row.ppl, "ranks": [float(r) for r in row.rank_per_layer]}
        print(f"{policy.name:24s} KL {row.kl:.5f}  PPL {row.ppl:.3f}  ranks {np.round(row.rank_per_layer).astype(int)}")
    if args.out:
        write_text_atomic(args.out, json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
