"""Train an RL agent on DRRL-Attention-v0, then compare it with baselines on held-out text.

    python train_agent.py [--algo maskable_ppo] [--total-timesteps 4500] [--seed 0] [env options]

Training logs to TensorBoard under ``--logdir/RUN`` (``RUN`` is ``--run-name``, by default
``DRRL-Attention-v0__ALGO__SEED__TIME``):
the hyperparameters, every reward term, FLOPs saved, fidelity, mask and violation rates, the
ranks per layer (histogram and heatmap), and the test PPL every ``--eval-every`` steps. It saves
checkpoints every ``--checkpoint-every`` steps and the agent as ``RUN/model.safetensors`` at the
end (an agent file: weights and a JSON description, loaded without unpickling; see
``agents.agent_file``); ``--resume RUN`` continues a run from its newest good checkpoint (same
curves, and on CPU the same final model as an uninterrupted run).

Then every policy of ``--compare`` and the agent run over the same seeded test-split episodes
with their ranks really in place (``agents.evaluate``): the LM's perplexity is measured, FLOPs
are ``drrl_env.flops`` relative to full attention (overheads included). ``python -m
agents.evaluate`` runs the full comparison (all baselines, corpora, both modes, figures).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.vec_env import VecEnv

from agents.agent_file import load_agent_into, load_sb3_zip, save_agent
from agents.algorithms import ALGORITHMS, ModelPolicy, get_algorithm
from agents.checkpoints import (
    CheckpointCallback,
    CorruptCheckpointError,
    at_episode_boundary,
    latest_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from agents.evaluate import comparison_table, evaluate_policy
from agents.policies import POLICIES, PolicySetup
from agents.residual import residual_setup, start_at_reference
from agents.train_config import (
    VEC_ENVS,
    TrainConfig,
    add_comparison_and_env_arguments,
    parse_hyperparams,
    resume_arguments,
)
from agents.training import GuardrailScheduleCallback, RankLoggingCallback, ValueWarmupCallback, make_vec_env
from agents.warm_start import WARM_STARTS, hindsight_teacher_dataset, scale_action_logits, teacher_estimate
from agents.zoo import check_policy_spec, make_policy
from drrl_env import ENV_ID
from drrl_env.cli import add_dataclass_arguments, at_least, env_kwargs
from drrl_env.files import check_output_folder, write_text_atomic
from oracle.dataset import check_dataset_fits_env

BC_MODEL = "bc_model.safetensors"
"""the behaviour-cloned agent a run starts from, in its run folder"""


def build_parser() -> argparse.ArgumentParser:
    """The options of TrainConfig, CompareConfig and EnvConfig (train_agent's env defaults: TRAIN_ENV_DEFAULTS)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(
        parser,
        TrainConfig,
        "training",
        choices={"algo": tuple(sorted(ALGORITHMS)), "vec": VEC_ENVS, "policy": POLICIES, "warm_start": WARM_STARTS},
        types={"total_timesteps": at_least(1), "n_envs": at_least(1), "n_steps": at_least(1), "bc_epochs": at_least(1),
               "warm_start_episodes": at_least(2),
               "history": at_least(1), "checkpoint_every": at_least(0), "eval_every": at_least(0)},
    )  # fmt: skip
    add_comparison_and_env_arguments(parser)
    return parser


RESUMABLE_CHANGES = frozenset(
    {"total_timesteps", "resume", "logdir", "checkpoint_every", "eval_every", "compare", "eval_episodes",
     "timing_repeats", "vec", "device", "trust_pickle"}
)  # fmt: skip
"""options a resumed run may be given with other values than it was started with"""


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """The options of a new run, or of a resumed one (:func:`agents.train_config.resume_arguments`)."""
    return resume_arguments(build_parser(), argv, RESUMABLE_CHANGES, "train_agent.py")


def check_run_name(name: str, logdir: Path) -> None:
    """``--run-name`` must name one new folder under ``--logdir``; a ``ValueError`` says which rule it breaks."""
    if not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise ValueError(f"--run-name {name!r}: expected one folder name (no '/', not '.' or '..')")
    if (logdir / name).exists():
        raise ValueError(
            f"--run-name {name!r}: {logdir / name} exists; choose another name or continue it with --resume"
        )


def check_arguments(args: argparse.Namespace) -> None:
    """Checks of the options that need no model: one-line ``ValueError``s naming the option."""
    algorithm = get_algorithm(args.algo)
    if (args.bc_dataset or args.bc_model) and not algorithm.masked:
        raise ValueError(f"--bc-dataset/--bc-model warm-start maskable_ppo only, not --algo {args.algo}")
    if args.bc_dataset and args.bc_model:
        raise ValueError("give --bc-dataset or --bc-model, not both")
    if args.residual and (args.bc_dataset or args.bc_model):
        raise ValueError("--residual starts at the static allocation; it takes no --bc-dataset or --bc-model")
    check_output_folder(args.logdir, "--logdir")
    if args.run_name is not None and not args.resume:
        check_run_name(args.run_name, Path(args.logdir))
    algorithm_hyperparameters(args)
    warmup = args.value_warmup_steps
    if warmup < 0 or (warmup and not algorithm.on_policy):
        raise ValueError(f"--value-warmup-steps {warmup}: expected 0, or > 0 with an actor-critic algo")
    for spec in args.compare:
        check_policy_spec(spec, "--compare")
    temperature = args.bc_temperature
    warm = args.bc_dataset or args.bc_model or (args.warm_start != "none" and not args.residual)
    if not (math.isfinite(temperature) and temperature > 0) or (temperature != 1 and not warm):
        raise ValueError(f"--bc-temperature {temperature}: expected a number > 0, != 1 only with a warm start")
    if args.resume:
        return  # the warm start happened when the run began
    for name in ("bc_dataset", "bc_model"):
        if getattr(args, name) and not Path(getattr(args, name)).exists():
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: no such file or folder")
    if args.bc_dataset:
        check_dataset_fits_env(args.bc_dataset, env_kwargs(args), "--bc-dataset")
    if args.bc_model and args.bc_model.endswith(".zip") and not args.trust_pickle:
        raise ValueError(
            f"--bc-model {args.bc_model} is an SB3 .zip, a pickle that can run code when loaded; "
            "pass --trust-pickle if you trust it, or give an agent .safetensors file"
        )


def algorithm_hyperparameters(args: argparse.Namespace) -> dict[str, Any]:
    """``--hyperparams`` as constructor keywords of the algorithm; one-line errors for bad JSON or unknown names."""
    algorithm = get_algorithm(args.algo)
    accepted = set(inspect.signature(algorithm.cls).parameters) - {"policy", "env", "policy_kwargs", "seed", "device"}
    return parse_hyperparams(args.hyperparams, accepted, algorithm.cls.__name__)


def check_episode_fit(args: argparse.Namespace, env: VecEnv) -> None:
    """On-policy rollouts must hold whole episodes: checkpoints (and so --resume) need episode boundaries."""
    steps = env.get_attr("num_layers")[0] * env.get_attr("num_segments")[0]
    if get_algorithm(args.algo).on_policy and args.n_steps % steps:
        raise ValueError(
            f"--n-steps {args.n_steps} is not a multiple of the episode length {steps} (layers x segments): "
            f"rollouts would end mid-episode and the run could not be checkpointed or resumed; "
            f"use e.g. --n-steps {max(1, round(args.n_steps / steps)) * steps}"
        )


def build_model(args: argparse.Namespace, env: VecEnv, run_dir: Path, setup: PolicySetup) -> BaseAlgorithm:
    """A new, behaviour-cloned, residual or resumed model on ``env``, logging to ``run_dir``."""
    from stable_baselines3.common.logger import configure

    algorithm = get_algorithm(args.algo)
    extra: dict[str, Any] = {"n_steps": args.n_steps}
    if algorithm.on_policy and "batch_size" in inspect.signature(algorithm.cls).parameters:
        extra["batch_size"] = min(64, args.n_steps * args.n_envs)
    extra.update(algorithm_hyperparameters(args))
    warm_zip = not args.resume and args.bc_model and args.bc_model.endswith(".zip")
    if warm_zip:  # a plain SB3 zip, with --trust-pickle
        model = load_sb3_zip(args.bc_model, algorithm, args.trust_pickle, env=env, seed=args.seed, **extra)
    else:
        model = algorithm.make(env, setup, args.seed, None, **extra)
    if args.residual and not args.resume:
        start_at_reference(model, setup)
    elif not args.resume and args.warm_start != "none" and not (args.bc_dataset or args.bc_model):
        kwargs = env_kwargs(args)
        if kwargs["flops_budget"] is None or not algorithm.masked:
            needs = "needs maskable_ppo and a --flops-budget; starting from scratch"
            print(f"note: --warm-start {args.warm_start} {needs}")
        else:
            estimate = teacher_estimate(args.warm_start)
            args.bc_dataset = str(hindsight_teacher_dataset(kwargs, args.warm_start_episodes, estimate))
    if args.resume:
        files = latest_checkpoint(run_dir / "checkpoints")
        if files is None:
            raise ValueError(f"--resume {run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}")
        restore_checkpoint(model, files)
        print(f"resuming {run_dir} from {files['agent'].stem} ({model.num_timesteps} steps done)")
    elif args.bc_dataset:
        from agents.bc import BCConfig, behaviour_clone

        bc, result = behaviour_clone(
            args.bc_dataset,
            BCConfig(args.policy, args.history, args.bc_epochs, seed=args.seed, entropy_coef=args.bc_entropy_coef),
            run_dir / "bc",
        )
        load_agent_into(model, save_agent(bc, run_dir / BC_MODEL))
        print(f"behaviour cloning: held-out agreement with the oracle {result.val_accuracy[-1]:.3f}")
    elif args.bc_model and not warm_zip:
        load_agent_into(model, args.bc_model)
    if not args.resume and args.bc_temperature != 1 and (args.bc_dataset or args.bc_model):
        scale_action_logits(model.policy, args.bc_temperature)
    model.set_logger(configure(str(run_dir), ["tensorboard"]))
    return model


def compare(
    args: argparse.Namespace, model: BaseAlgorithm, kwargs: dict[str, Any], run_dir: Path, setup: PolicySetup
) -> None:
    """Run ``--compare``'s baselines, the behaviour-cloned start (if any) and the agent over the same test episodes."""
    algorithm = get_algorithm(args.algo)
    policies = [make_policy(spec, kwargs, args.trust_pickle) for spec in args.compare]
    if (run_dir / BC_MODEL).is_file():
        policies.append(make_policy(str(run_dir / BC_MODEL), kwargs))
        policies[-1].name = "bc (this run's start)"
    policies.append(ModelPolicy(model.policy, algorithm, setup, f"{args.algo} (this run)"))
    print(comparison_table(policies, kwargs, args.eval_episodes, args.timing_repeats))


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_arguments(argv)
        check_arguments(args)
        setup = residual_setup(args)  # with --residual: the static allocation and the paired reward, in args
        kwargs = env_kwargs(args)
        env = make_vec_env(kwargs, setup, args.n_envs, args.seed, args.vec)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        check_episode_fit(args, env)
        if args.resume:
            run_dir = Path(args.resume)
        else:
            run_dir = Path(args.logdir) / (args.run_name or f"{ENV_ID}__{args.algo}__{args.seed}__{int(time.time())}")
            run_dir.mkdir(parents=True, exist_ok=False)
            write_text_atomic(run_dir / "config.json", json.dumps(vars(args), indent=2, default=str))
        model = build_model(args, env, run_dir, setup)
    except (ValueError, FileNotFoundError, CorruptCheckpointError) as error:
        env.close()
        print(f"error: {error}", file=sys.stderr)
        return 2
    algorithm = get_algorithm(args.algo)

    def evaluate_now(current: BaseAlgorithm) -> dict[str, float]:
        row = evaluate_policy(ModelPolicy(current.policy, algorithm, setup, "agent"), kwargs, 1, timing_repeats=0)
        return {"ppl": row.ppl, "flops_ratio": row.flops_ratio, "mean_rank": row.mean_rank}

    callbacks = [RankLoggingCallback(vars(args), evaluate_now, args.eval_every)]
    if args.checkpoint_every:  # before the schedule: a checkpoint keeps the eps_t its pending episode was reset with
        callbacks.append(CheckpointCallback(run_dir / "checkpoints", args.checkpoint_every, setup))
    callbacks.append(GuardrailScheduleCallback())
    if args.value_warmup_steps:
        callbacks.append(ValueWarmupCallback(args.value_warmup_steps))
    remaining = args.total_timesteps - model.num_timesteps
    if remaining > 0:
        model.learn(remaining, callback=callbacks, progress_bar=True, reset_num_timesteps=False)
    if at_episode_boundary(model):
        save_checkpoint(model, run_dir / "checkpoints", setup)
    else:
        print("note: the run ended mid-episode; --resume continues from its last checkpoint", file=sys.stderr)
    path = save_agent(model, run_dir / "model.safetensors", setup)
    model.get_env().close()
    print(f"saved {path} ({model.num_timesteps} steps); tensorboard --logdir {run_dir.parent}")
    if args.compare:
        compare(args, model, kwargs, run_dir, setup)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
