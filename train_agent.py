"""Train the best rank agent the project knows, then compare it with the fixed rules at the same budget.

    python train_agent.py                      # the default recipe (--preset per-head), about 10 min on 2 CPU cores
    python train_agent.py --preset per-layer   # another recipe: per-head, scratch, per-layer, residual, paper
    python train_agent.py --env DRRL-Attention-Paper-v0 --warm-start none   # any registered env, any option
    python train_agent.py --env DRRL-KVCache-v0    # the key cache of generation (--preset kvcache)

The default recipe trains in ``DRRL-Attention-v0`` (what ``gym.make`` gives): one rank per key/value
head group, the Eq. S signal in the observation, a budget of 0.625 of full attention's logit FLOPs.
It behaviour-clones the hindsight teacher (the water-fill of each episode's budget over the same
signal; a dataset built once and cached), fine-tunes the clone with MaskablePPO, saves the agent as
``RUN/model.safetensors`` (weights and a JSON header, loaded without unpickling), and runs the agent,
its clone and ``--compare``'s policies over the same seeded test-split episodes with their ranks
really in place (``agents.evaluate``). docs/training.md explains every recipe and what it measured.

Training logs to TensorBoard under ``--logdir/RUN`` (``RUN`` is ``--run-name``, by default
``ENV__ALGO__SEED__TIME``). ``--resume RUN`` continues a run from its newest good checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
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
from agents.kv_evaluate import check_kv_spec, kv_comparison, kv_markdown_table, make_kv_policy, write_kv_csv
from agents.networks import NETWORKS, PolicySetup
from agents.residual import residual_setup, start_at_reference
from agents.results import read_csv
from agents.tensorboard import sb3_writer, write_hparams, write_training_layout
from agents.train_config import (
    PPO_NEAR_CLONE,
    PRESETS,
    VEC_ENVS,
    RunOptions,
    TrainConfig,
    add_comparison_and_env_arguments,
    chosen_preset,
    parse_hyperparams,
    resume_options,
)
from agents.training import GuardrailScheduleCallback, RankLoggingCallback, ValueWarmupCallback, make_vec_env
from agents.warm_start import (
    KV_WARM_STARTS,
    WARM_STARTS,
    hindsight_teacher_dataset,
    kv_teacher_dataset,
    scale_action_logits,
    teacher_estimate,
)
from agents.zoo import check_policy_spec, make_policy
from drrl_env.cli import add_dataclass_arguments, at_least
from drrl_env.kvcache import KVCACHE_ENV_ID, shared_prompt_states
from drrl_env.lm.corpora import EVALUATION_ONLY, load_corpus
from drrl_env.lm.files import check_output_folder, lock_folder, write_text_atomic
from oracle.dataset import check_dataset_fits_env

BC_MODEL = "bc_model.safetensors"
"""the behaviour-cloned agent a run starts from, in its run folder"""


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The options of TrainConfig, CompareConfig and EnvConfig, their defaults those of ``--preset`` and ``--env``."""
    preset, env_id = chosen_preset(argv)
    presets = "; ".join(f"{name}: {recipe.summary}" for name, recipe in PRESETS.items())
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=f"presets: {presets}"
    )
    add_dataclass_arguments(
        parser,
        TrainConfig,
        "training",
        defaults=preset.train,
        choices={"preset": tuple(PRESETS), "algo": tuple(sorted(ALGORITHMS)), "vec": VEC_ENVS, "network": NETWORKS,
                 "warm_start": WARM_STARTS},
        types={"total_timesteps": at_least(1), "n_envs": at_least(1), "n_steps": at_least(1), "bc_epochs": at_least(1),
               "warm_start_episodes": at_least(2),
               "history": at_least(1), "checkpoint_every": at_least(0), "eval_every": at_least(0)},
    )  # fmt: skip
    add_comparison_and_env_arguments(parser, preset, env_id)
    return parser


RESUMABLE_CHANGES = frozenset(
    {"total_timesteps", "resume", "logdir", "checkpoint_every", "eval_every", "compare", "eval_episodes",
     "timing_repeats", "vec", "device", "trust_pickle"}
)  # fmt: skip
"""options a resumed run may be given with other values than it was started with"""


def parse_options(argv: list[str] | None) -> RunOptions:
    """The options of a new run, or of a resumed one (:func:`agents.train_config.resume_options`)."""
    options = resume_options(build_parser(argv), argv, RESUMABLE_CHANGES, "train_agent.py")
    run = RunOptions.from_options(options)
    train = run.train
    if train.algo != "maskable_ppo" and train.hyperparams == PPO_NEAR_CLONE:  # the preset's, for MaskablePPO only
        train.hyperparams = None
    return run


def check_run_name(name: str, logdir: Path) -> None:
    """``--run-name`` must name one new folder under ``--logdir``; a ``ValueError`` says which rule it breaks."""
    if not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise ValueError(f"--run-name {name!r}: expected one folder name (no '/', not '.' or '..')")
    if (logdir / name).exists():
        raise ValueError(
            f"--run-name {name!r}: {logdir / name} exists; choose another name or continue it with --resume"
        )


def check_kv_options(run: RunOptions) -> None:
    """The options DRRL-KVCache-v0 refuses or reads otherwise: one-line ``ValueError``s naming the option."""
    train = run.train
    if train.warm_start not in KV_WARM_STARTS:
        raise ValueError(f"--warm-start {train.warm_start}: {KVCACHE_ENV_ID} takes one of {KV_WARM_STARTS}")
    if train.residual:
        raise ValueError(f"--residual starts at a DRRL-Attention static allocation; {KVCACHE_ENV_ID} has none")
    if train.eval_every:
        raise ValueError(f"--eval-every: {KVCACHE_ENV_ID}'s evaluation is the comparison after training")
    if run.env["cache_budget"] is None and run.compare.compare:
        raise ValueError("--cache-budget none: the comparison is at equal key-cache bytes; give a budget")


def check_options(run: RunOptions) -> None:
    """Checks of the options that need no model: one-line ``ValueError``s naming the option."""
    train = run.train
    algorithm = get_algorithm(train.algo)
    if run.env_id == KVCACHE_ENV_ID:
        check_kv_options(run)
    elif train.warm_start == "self_profile":
        raise ValueError(f"--warm-start {train.warm_start}: the teacher of {KVCACHE_ENV_ID}, not of {run.env_id}")
    if (train.bc_dataset or train.bc_model) and not algorithm.masked:
        raise ValueError(f"--bc-dataset/--bc-model warm-start maskable_ppo only, not --algo {train.algo}")
    if train.bc_dataset and train.bc_model:
        raise ValueError("give --bc-dataset or --bc-model, not both")
    if train.residual and (train.bc_dataset or train.bc_model):
        raise ValueError("--residual starts at the static allocation; it takes no --bc-dataset or --bc-model")
    check_output_folder(train.logdir, "--logdir")
    if train.run_name is not None and not train.resume:
        check_run_name(train.run_name, Path(train.logdir))
    algorithm_hyperparameters(train)
    warmup = train.value_warmup_steps
    if warmup < 0 or (warmup and not algorithm.on_policy):
        raise ValueError(f"--value-warmup-steps {warmup}: expected 0, or > 0 with an actor-critic algo")
    for spec in run.compare.compare:
        if run.env_id == KVCACHE_ENV_ID:
            check_kv_spec(spec, "--compare")
        else:
            check_policy_spec(spec, "--compare")
        if spec.endswith(".zip") and not train.trust_pickle:
            raise ValueError(
                f"--compare {spec} is an SB3 .zip, a pickle that can run code; pass --trust-pickle if you trust it"
            )
    splits = ["train"] + (["test"] if run.compare.compare else [])
    for split in splits:  # a corpus too small for a split the run needs is refused now, not after training
        load_corpus(run.env["corpus"], split if run.env["corpus"] not in EVALUATION_ONLY else "test")
    temperature = train.bc_temperature
    warm = train.bc_dataset or train.bc_model or (train.warm_start != "none" and not train.residual)
    if not (math.isfinite(temperature) and temperature > 0) or (temperature != 1 and not warm):
        raise ValueError(f"--bc-temperature {temperature}: expected a number > 0, != 1 only with a warm start")
    if train.resume:
        return  # the warm start happened when the run began
    for name in ("bc_dataset", "bc_model"):
        if getattr(train, name) and not Path(getattr(train, name)).exists():
            raise ValueError(f"--{name.replace('_', '-')} {getattr(train, name)}: no such file or folder")
    if train.bc_dataset:
        check_dataset_fits_env(train.bc_dataset, run.env, "--bc-dataset")
    if train.bc_model and train.bc_model.endswith(".zip") and not train.trust_pickle:
        raise ValueError(
            f"--bc-model {train.bc_model} is an SB3 .zip, a pickle that can run code when loaded; "
            "pass --trust-pickle if you trust it, or give an agent .safetensors file"
        )


def algorithm_hyperparameters(train: TrainConfig) -> dict[str, Any]:
    """``--hyperparams`` as constructor keywords of the algorithm; one-line errors for bad JSON or unknown names."""
    algorithm = get_algorithm(train.algo)
    accepted = set(inspect.signature(algorithm.cls).parameters) - {"policy", "env", "policy_kwargs", "seed", "device"}
    return parse_hyperparams(train.hyperparams, accepted, algorithm.cls.__name__)


def check_episode_fit(train: TrainConfig, env: VecEnv) -> None:
    """On-policy rollouts must hold whole episodes: checkpoints (and so --resume) need episode boundaries."""
    steps = env.get_attr("num_layers")[0] * env.get_attr("num_segments")[0]
    if get_algorithm(train.algo).on_policy and train.n_steps % steps:
        raise ValueError(
            f"--n-steps {train.n_steps} is not a multiple of the episode length {steps} (layers x segments): "
            f"rollouts would end mid-episode and the run could not be checkpointed or resumed; "
            f"use e.g. --n-steps {max(1, round(train.n_steps / steps)) * steps}"
        )


def build_model(run: RunOptions, env: VecEnv, run_dir: Path, setup: PolicySetup) -> BaseAlgorithm:
    """A new, behaviour-cloned, residual or resumed model on ``env``, logging to ``run_dir``."""
    from stable_baselines3.common.logger import configure

    train = run.train
    algorithm = get_algorithm(train.algo)
    extra: dict[str, Any] = {"n_steps": train.n_steps}
    if algorithm.on_policy and "batch_size" in inspect.signature(algorithm.cls).parameters:
        extra["batch_size"] = min(64, train.n_steps * train.n_envs)
    extra.update(algorithm_hyperparameters(train))
    bc_dataset = train.bc_dataset
    warm_zip = not train.resume and train.bc_model and train.bc_model.endswith(".zip")
    if warm_zip:  # a plain SB3 zip, with --trust-pickle
        model = load_sb3_zip(train.bc_model, algorithm, train.trust_pickle, env=env, seed=train.seed, **extra)
    else:
        model = algorithm.make(env, setup, train.seed, None, **extra)
    if train.residual and not train.resume:
        start_at_reference(model, setup)
    elif not train.resume and train.warm_start != "none" and not (bc_dataset or train.bc_model):
        budget = "cache_budget" if run.env_id == KVCACHE_ENV_ID else "flops_budget"
        if run.env[budget] is None or not algorithm.masked:
            needs = f"needs maskable_ppo and a --{budget.replace('_', '-')}; starting from scratch"
            print(f"note: --warm-start {train.warm_start} {needs}")
        elif train.warm_start == "self_profile":
            bc_dataset = str(kv_teacher_dataset(run.env, train.warm_start_episodes))
        else:
            estimate = teacher_estimate(train.warm_start)
            bc_dataset = str(hindsight_teacher_dataset(run.env, train.warm_start_episodes, estimate))
    if train.resume:
        files = latest_checkpoint(run_dir / "checkpoints")
        if files is None:
            raise ValueError(f"--resume {run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}")
        restore_checkpoint(model, files)
        print(f"resuming {run_dir} from {files['agent'].stem} ({model.num_timesteps} steps done)")
    elif bc_dataset:
        from agents.bc import BCConfig, behaviour_clone

        bc_config = BCConfig(
            train.network,
            train.history,
            train.bc_epochs,
            seed=train.seed,
            entropy_coef=train.bc_entropy_coef,
            verify=train.verify,
        )
        bc, result = behaviour_clone(bc_dataset, bc_config, run_dir / "bc")
        load_agent_into(model, save_agent(bc, run_dir / BC_MODEL))
        print(
            f"behaviour cloning: held-out agreement with the teacher {result.val_accuracy[-1]:.3f} "
            f"({result.held_out} held out)"
        )
    elif train.bc_model and not warm_zip:
        load_agent_into(model, train.bc_model)
    if not train.resume and train.bc_temperature != 1 and (bc_dataset or train.bc_model):
        scale_action_logits(model.policy, train.bc_temperature)
    model.set_logger(configure(str(run_dir), ["tensorboard"]))
    write_training_layout(sb3_writer(model))
    return model


def kv_compare(run: RunOptions, model: BaseAlgorithm, run_dir: Path, setup: PolicySetup) -> dict[str, float]:
    """The key-cache comparison (``agents.kv_evaluate``): ``--compare``, the clone and the agent at both budgets."""
    algorithm = get_algorithm(run.train.algo)
    policies = [make_kv_policy(spec, run.env, trust_pickle=run.train.trust_pickle) for spec in run.compare.compare]
    if (run_dir / BC_MODEL).is_file():
        policies.append(make_policy(str(run_dir / BC_MODEL), run.env))
        policies[-1].name = "bc (this run's start)"
    policies.append(ModelPolicy(model.policy, algorithm, setup, f"{run.train.algo} (this run)"))
    budgets = sorted(set(run.env["cache_budget"]), reverse=True)
    rows = kv_comparison(policies, run.env, run.compare.eval_episodes, budgets)
    write_kv_csv(rows, run_dir / "comparison.csv")
    print("\n" + kv_markdown_table(rows, run.env) + f"\n(every column in {run_dir / 'comparison.csv'})")
    agent = [row for row in rows if row.policy == policies[-1].name]
    return {
        "hparams/test_kl": float(np.mean([row.kl for row in agent])),
        "hparams/test_headroom_captured": float(np.mean([row.headroom_captured for row in agent])),
    }


def compare(run: RunOptions, model: BaseAlgorithm, run_dir: Path, setup: PolicySetup) -> dict[str, float]:
    """Run ``--compare``'s baselines, the behaviour-cloned start (if any) and the agent over the same test episodes."""
    train = run.train
    if run.env_id == KVCACHE_ENV_ID:
        return kv_compare(run, model, run_dir, setup)
    algorithm = get_algorithm(train.algo)
    policies = [make_policy(spec, run.env, train.trust_pickle) for spec in run.compare.compare]
    if (run_dir / BC_MODEL).is_file():
        policies.append(make_policy(str(run_dir / BC_MODEL), run.env))
        policies[-1].name = "bc (this run's start)"
    policies.append(ModelPolicy(model.policy, algorithm, setup, f"{train.algo} (this run)"))
    table = comparison_table(
        policies, run.env, run.compare.eval_episodes, run.compare.timing_repeats, run_dir / "comparison.csv"
    )
    print(table)
    agent = read_csv(run_dir / "comparison.csv")[-1]
    return {"hparams/test_kl": agent.kl, "hparams/test_headroom_captured": agent.headroom_captured}


def train_and_compare(run: RunOptions) -> int:
    """Train the run's agent (new or resumed), save it, and print the comparison; the exit code.

    In the key-cache env the teacher's dataset and the training share the train prompts' states
    (:func:`drrl_env.kvcache.shared_prompt_states`), released before the comparison.
    """
    with contextlib.ExitStack() as sharing:
        if run.env_id == KVCACHE_ENV_ID:
            sharing.enter_context(shared_prompt_states())
        return _train_and_compare(run, sharing)


def _train_and_compare(run: RunOptions, sharing: contextlib.ExitStack) -> int:
    train = run.train
    try:
        check_options(run)
        setup = residual_setup(train, run.env)  # with --residual: the static allocation and the paired reward
        env = make_vec_env(run.env, setup, train.n_envs, train.seed, train.vec, run.env_id)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        check_episode_fit(train, env)
        if train.resume:
            run_dir = Path(train.resume)
            lock = lock_folder(run_dir)  # noqa: F841 - held until the process ends
        else:
            name = train.run_name or f"{run.env_id}__{train.algo}__{train.seed}__{int(time.time())}"
            run_dir = Path(train.logdir) / name
            try:
                run_dir.mkdir(parents=True, exist_ok=False)
            except FileExistsError:
                raise ValueError(f"--run-name {name!r}: {run_dir} was just created by another run") from None
            lock = lock_folder(run_dir)  # noqa: F841
            write_text_atomic(run_dir / "config.json", json.dumps(run.to_json(), indent=2))
        model = build_model(run, env, run_dir, setup)
    except (ValueError, FileNotFoundError, CorruptCheckpointError) as error:
        env.close()
        print(f"error: {error}", file=sys.stderr)
        return 2
    algorithm = get_algorithm(train.algo)

    def evaluate_now(current: BaseAlgorithm) -> dict[str, float]:
        row = evaluate_policy(ModelPolicy(current.policy, algorithm, setup, "agent"), run.env, 1, timing_repeats=0)
        return {"ppl": row.ppl, "flops_ratio": row.flops_ratio, "mean_rank": row.mean_rank}

    callbacks = [RankLoggingCallback(run.to_json(), evaluate_now, train.eval_every)]
    if train.checkpoint_every:  # before the schedule: a checkpoint keeps the eps_t its pending episode was reset with
        callbacks.append(CheckpointCallback(run_dir / "checkpoints", train.checkpoint_every, setup))
    if run.env_id != KVCACHE_ENV_ID:  # the key-cache env has no guardrail
        callbacks.append(GuardrailScheduleCallback())
    if train.value_warmup_steps:
        callbacks.append(ValueWarmupCallback(train.value_warmup_steps))
    remaining = train.total_timesteps - model.num_timesteps
    if remaining > 0:
        print(f"training {train.algo} for {remaining} env steps")
        try:
            model.learn(remaining, callback=callbacks, progress_bar=True, reset_num_timesteps=False)
        except KeyboardInterrupt:
            saved = at_episode_boundary(model) and save_checkpoint(model, run_dir / "checkpoints", setup)
            where = f"a checkpoint at {model.num_timesteps} steps" if saved else "its last checkpoint"
            print(f"\ninterrupted; python train_agent.py --resume {run_dir} continues from {where}", file=sys.stderr)
            return 130
    if at_episode_boundary(model):
        save_checkpoint(model, run_dir / "checkpoints", setup)
    else:
        print("note: the run ended mid-episode; --resume continues from its last checkpoint", file=sys.stderr)
    path = save_agent(model, run_dir / "model.safetensors", setup)
    model.get_env().close()
    sharing.close()  # the train prompts' states: the comparison runs on the test prompts
    print(f"saved {path} ({model.num_timesteps} steps); tensorboard --logdir {run_dir.parent}")
    metrics = {"hparams/num_timesteps": float(model.num_timesteps)}
    if run.compare.compare:
        metrics |= compare(run, model, run_dir, setup)
    write_hparams(sb3_writer(model), run.to_json(), metrics)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        run = parse_options(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return train_and_compare(run)


if __name__ == "__main__":
    raise SystemExit(main())
