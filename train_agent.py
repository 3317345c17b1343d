"""Train an RL agent on DRRL-Attention-v0, then compare it with baselines on held-out text.

    python train_agent.py [--algo maskable_ppo] [--total-timesteps 15000] [--seed 0] [env options]

Training logs to TensorBoard under ``--logdir/RUN`` (``RUN = DRRL-Attention-v0__ALGO__SEED__TIME``):
the hyperparameters, every reward term, FLOPs saved, fidelity, mask and violation rates, the
ranks per layer (histogram and heatmap), and the test PPL every ``--eval-every`` steps. It saves
checkpoints every ``--checkpoint-every`` steps and ``RUN/model.zip`` at the end; ``--resume RUN``
continues a run (same curves, and on CPU the same final model as an uninterrupted run).

Then every policy of ``--compare`` and the agent run over the same seeded test-split episodes
with their ranks really in place (``agents.evaluate``): the LM's perplexity is measured, FLOPs
are ``drrl_env.flops`` relative to full attention (overheads included). ``python -m
agents.evaluate`` runs the full comparison (all baselines, corpora, both modes, figures).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from agents.algorithms import ALGORITHMS, ModelPolicy, get_algorithm
from agents.evaluate import evaluate_policy, make_policy, markdown_table
from agents.policies import DEFAULT_HISTORY, POLICIES, policy_setup, setup_of_observation_space
from agents.training import (
    CheckpointCallback,
    GuardrailScheduleCallback,
    RankLoggingCallback,
    latest_checkpoint,
    make_vec_env,
    restore_checkpoint,
    save_checkpoint,
)
from drrl_env import ENV_ID
from drrl_env.cli import add_env_arguments, env_kwargs
from oracle.dataset import write_atomic

DEFAULT_COMPARE = ("full", "uniform", "fixed:32", "energy:0.9", "stable_rank", "oracle")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training = parser.add_argument_group("training")
    training.add_argument(
        "--algo", default="maskable_ppo", choices=sorted(ALGORITHMS), help="RL algorithm (default: maskable_ppo)"
    )
    training.add_argument("--total-timesteps", type=int, default=15000, help="env steps of training (default: 15000)")
    training.add_argument("--seed", type=int, default=0, help="seed of the agent and of the episodes (default: 0)")
    training.add_argument("--n-envs", type=int, default=1, help="parallel envs (default: 1)")
    training.add_argument(
        "--vec", choices=("sync", "subproc"), default="sync", help="vector env: in-process or one process per env"
    )
    training.add_argument(
        "--n-steps",
        type=int,
        default=150,
        help="rollout length per env and update for on-policy algorithms; a multiple of the episode length "
        "(layers x segments) keeps checkpoints at episode boundaries, which --resume needs (default: 150)",
    )
    training.add_argument("--policy", choices=POLICIES, default="mlp", help="policy network (default: mlp)")
    training.add_argument(
        "--history", type=int, default=DEFAULT_HISTORY, help="states the transformer policy attends over (default: 8)"
    )
    training.add_argument("--bc-dataset", help="oracle dataset (python -m oracle): behaviour-clone on it first")
    training.add_argument("--bc-model", help="start from this behaviour-cloned model (python -m agents.bc)")
    training.add_argument("--bc-epochs", type=int, default=30, help="behaviour-cloning epochs with --bc-dataset")
    training.add_argument(
        "--bc-entropy-coef",
        type=float,
        default=0.0,
        help="entropy bonus of behaviour cloning with --bc-dataset; > 0 leaves PPO room to explore (default: 0)",
    )
    training.add_argument("--logdir", default="runs", help="folder of the runs (default: runs)")
    training.add_argument(
        "--checkpoint-every", type=int, default=0, help="checkpoint every N env steps (default: 0, only at the end)"
    )
    training.add_argument(
        "--resume", help="run folder to continue (its newest checkpoint); --total-timesteps is the total"
    )
    training.add_argument(
        "--eval-every", type=int, default=0, help="log the test PPL of the agent every N env steps (default: 0, never)"
    )
    comparison = parser.add_argument_group("comparison after training")
    comparison.add_argument(
        "--compare",
        nargs="*",
        default=list(DEFAULT_COMPARE),
        help=f"baselines to compare the agent with (default: {' '.join(DEFAULT_COMPARE)}); none: skip",
    )
    comparison.add_argument("--eval-episodes", type=int, default=4, help="test episodes per policy (default: 4)")
    comparison.add_argument(
        "--timing-repeats", type=int, default=2, help="timed forward replays per policy for ms/token (default: 2)"
    )
    add_env_arguments(parser, seq_len=128, batch_size=1)
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    algorithm = get_algorithm(args.algo)
    if (args.bc_dataset or args.bc_model) and not algorithm.masked:
        raise ValueError(f"--bc-dataset/--bc-model warm-start maskable_ppo only, not --algo {args.algo}")
    if args.bc_dataset and args.bc_model:
        raise ValueError("give --bc-dataset or --bc-model, not both")
    for name in ("total_timesteps", "n_envs", "n_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.resume and not Path(args.resume, "config.json").is_file():
        raise ValueError(f"--resume {args.resume}: not a run folder of train_agent.py (no config.json)")


def build_model(args: argparse.Namespace, run_dir: Path):
    """A new, behaviour-cloned, or resumed model on fresh vector envs, logging to ``run_dir``."""
    from stable_baselines3.common.logger import configure

    algorithm = get_algorithm(args.algo)
    kwargs = env_kwargs(args)
    extra: dict[str, Any] = {"n_steps": args.n_steps, "batch_size": min(64, args.n_steps * args.n_envs)}
    if not algorithm.on_policy or args.algo in ("a2c",):
        extra.pop("batch_size")
    if args.resume:
        checkpoint = latest_checkpoint(run_dir / "checkpoints")
        if checkpoint is None:
            raise ValueError(f"--resume {run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}")
        model = algorithm.cls.load(checkpoint, device="cpu")
        setup = setup_of_observation_space(model.observation_space)
        model.set_env(make_vec_env(kwargs, setup, args.n_envs, args.seed, args.vec))
        restore_checkpoint(model, checkpoint)
        print(f"resuming {run_dir} from {checkpoint.name} ({model.num_timesteps} steps done)")
    else:
        setup = policy_setup(args.policy, args.history)
        env = make_vec_env(kwargs, setup, args.n_envs, args.seed, args.vec)
        bc_model = args.bc_model
        if args.bc_dataset:
            from agents.bc import BCConfig, behaviour_clone, save_model_atomic

            bc, result = behaviour_clone(
                args.bc_dataset,
                BCConfig(args.policy, args.history, args.bc_epochs, seed=args.seed, entropy_coef=args.bc_entropy_coef),
                run_dir / "bc",
            )
            bc_model = save_model_atomic(bc, run_dir / "bc_model.zip")
            print(f"behaviour cloning: held-out agreement with the oracle {result.val_accuracy[-1]:.3f}")
        if bc_model:
            model = algorithm.cls.load(bc_model, env=env, device="cpu", seed=args.seed, **extra)
            if setup_of_observation_space(model.observation_space).name != setup.name:
                raise ValueError(f"--bc-model {bc_model} was trained with another --policy than {args.policy!r}")
        else:
            model = algorithm.make(env, setup, args.seed, None, **extra)
    model.set_logger(configure(str(run_dir), ["tensorboard"]))
    return model


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    kwargs = env_kwargs(args)
    if args.resume:
        run_dir = Path(args.resume)
    else:
        run_dir = Path(args.logdir) / f"{ENV_ID}__{args.algo}__{args.seed}__{int(time.time())}"
        run_dir.mkdir(parents=True, exist_ok=False)
        (run_dir / "config.json").write_text(json.dumps(vars(args), indent=2, default=str))
    model = build_model(args, run_dir)
    algorithm = get_algorithm(args.algo)

    def evaluate_now(current) -> dict[str, float]:
        policy = ModelPolicy(current, algorithm, setup_of_observation_space(current.observation_space), "agent")
        row = evaluate_policy(policy, kwargs, episodes=1, timing_repeats=0)
        return {"ppl": row.ppl, "flops_ratio": row.flops_ratio, "mean_rank": row.mean_rank}

    callbacks = [RankLoggingCallback(vars(args), evaluate_now, args.eval_every)]
    if args.checkpoint_every:  # before the schedule: a checkpoint keeps the eps_t its pending episode was reset with
        callbacks.append(CheckpointCallback(run_dir / "checkpoints", args.checkpoint_every))
    callbacks.append(GuardrailScheduleCallback())
    remaining = args.total_timesteps - model.num_timesteps
    if remaining > 0:
        model.learn(remaining, callback=callbacks, progress_bar=True, reset_num_timesteps=False)
    save_checkpoint(model, run_dir / "checkpoints")
    write_atomic(run_dir / "model.zip", model.save)  # a kill mid-save leaves the previous file or none
    model.get_env().close()
    print(f"saved {run_dir / 'model.zip'} ({model.num_timesteps} steps); tensorboard --logdir {run_dir.parent}")

    if args.compare:
        setup = setup_of_observation_space(model.observation_space)
        policies = [make_policy(spec, kwargs) for spec in args.compare]
        policies.append(ModelPolicy(model, algorithm, setup, f"{args.algo} (this run)"))
        rows = [
            evaluate_policy(policy, kwargs, args.eval_episodes, timing_repeats=args.timing_repeats)
            for policy in tqdm(policies, desc="comparing on the test split", unit="policy")
        ]
        print(
            f"\ntest split of {args.corpus}, {args.eval_episodes} episodes of {args.batch_size}x{args.seq_len} tokens, "
            f"mode={args.spectral_mode}, guardrail={args.guardrail}, flops_budget={kwargs['flops_budget']}"
        )
        print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
