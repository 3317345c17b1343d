"""Train an agent on DRRL-Attention-v0 with Ray RLlib: PPO with action masking, on one machine or a cluster.

    python -m agents.rllib [--num-env-runners 2] [--total-timesteps 4500] [--seed 0] [env options]
    python -m agents.rllib --env DRRL-KVCache-v0 [--bc-model RUN/bc_model.safetensors]   # the key-cache env

The second training backend beside train_agent.py's SB3 (install the extra: pip install
'drrl[rllib]'). RLlib's new API stack, following its own action-masking example: the env is
wrapped by drrl_env.wrappers.MaskInObservation (observations {"observations", "action_mask"}),
registered with ray.tune.registry.register_env, and trained by PPO with RLlib's
ActionMaskingTorchRLModule, which adds log(mask) to the logits, so a masked rank is never
sampled. Every env option below reaches each env through env_config, and each env runner
process loads the LM once. The policy and value networks are SB3's MlpPolicy (two 64-64 tanh
MLPs) and PPO's hyperparameters default to SB3's (lr 3e-4, GAE lambda 0.95, clip 0.2, 10 epochs,
minibatches of 64); --hyperparams sets any other PPOConfig.training() keyword. --bc-model starts
from a behaviour-cloned agent file of the SB3 side (python -m agents.bc, or a train_agent run's
bc_model.safetensors): the same network, so its weights load as they are.

Scaling out: each env runner is one Ray actor (one CPU by default) running its envs; RLlib
samples them in parallel and the learner updates in this process. --ray-address auto joins a
running cluster (ray start --head on one machine, ray start --address=HEAD:6379 on the others,
drrl installed on every machine); without it a local Ray starts and stops with the run.

TensorBoard logs go to --logdir/RUN (RUN = DRRL-Attention-v0__rllib_ppo__SEED__TIME) under SB3's
names: rollout/ep_rew_mean, train/... (RLlib's learner statistics), time/fps, drrl/... (reward
terms, FLOPs saved, mask and violation rates, rank heatmap and histogram) and eval/ppl. RLlib's
own checkpoints go to RUN/checkpoints every --checkpoint-every steps and at the end; --resume RUN
continues from the newest (RLlib's restore: weights, optimizer, counters; the episodes drawn after
it are not those an uninterrupted run would draw). The trained policy is saved as
RUN/model.safetensors (loaded without unpickling; python -m agents.evaluate --policies PATH takes it).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
from tqdm.auto import tqdm

from agents.evaluate import comparison_table, evaluate_policy
from agents.kv_evaluate import kv_comparison, kv_markdown_table, make_kv_policy
from agents.rllib_agent import (
    MODEL_CONFIG,
    RLlibPolicy,
    build_module,
    require_rllib,
    save_rllib_agent,
    sb3_weights_as_rllib,
)
from agents.train_config import (
    CompareConfig,
    add_comparison_and_env_arguments,
    chosen_preset,
    parse_hyperparams,
    resume_options,
)
from agents.zoo import make_policy
from drrl_env import ENV_ID
from drrl_env.cli import add_dataclass_arguments, at_least, dataclass_from_options, env_kwargs
from drrl_env.kvcache import KVCACHE_ENV_ID
from drrl_env.lm.files import check_output_folder, write_text_atomic
from drrl_env.wrappers import MaskInObservation, MaskInVectorObservation

ALGO = "rllib_ppo"
ENV_NAME = "DRRL-Attention-v0-masked"
"""the name the masked env is registered under with ray.tune"""
SB3_PPO_DEFAULTS = {"lr": 3e-4, "gamma": 0.99, "lambda_": 0.95, "clip_param": 0.2, "use_kl_loss": False}
CHECKPOINT_PREFIX = "step_"


@dataclass
class RLlibConfig:
    """How agents.rllib trains (the env's options come from ``EnvConfig``)."""

    total_timesteps: int = 4500
    """env steps of training (with --resume: the total, steps already done included)"""
    seed: int = 0
    """seed of the agent and of the envs (RLlib seeds each env runner's envs from it)"""
    num_env_runners: int = 1
    """Ray actors sampling episodes in parallel (0: sample in this process)"""
    num_envs_per_env_runner: int = 1
    """envs per env runner, stepped as one gymnasium vector env"""
    batched_envs: bool = False
    """run each env runner's envs as the env's native vector env (drrl_env.vector): their episodes through one
    batched forward pass of the LM, instead of one forward pass per env"""
    num_cpus_per_env_runner: int = 1
    """CPUs each env runner reserves (Ray gives the actor that many torch threads)"""
    num_gpus_per_env_runner: float = 0.0
    """GPUs each env runner reserves (a fraction shares one GPU; the env then runs the LM on CUDA)"""
    num_gpus: float = 0.0
    """GPUs of the learner (the PPO update)"""
    ray_address: str | None = None
    """Ray cluster to join ('auto': the one started on this machine with ray start); none: start a local Ray"""
    train_batch_size: int = 150
    """env steps per training iteration (PPO's rollout; 150 = 5 episodes of the default model's 30 layers)"""
    minibatch_size: int = 64
    """PPO minibatch size"""
    num_epochs: int = 10
    """PPO epochs over each iteration's batch"""
    bc_model: str | None = None
    """start from this behaviour-cloned agent (a maskable_ppo 'mlp' agent file: python -m agents.bc, or a
    train_agent run's bc_model.safetensors; the networks are the same)"""
    hyperparams: str | None = None
    """other keywords of RLlib's PPOConfig.training() as a JSON object, e.g. '{"lr": 1e-4, "entropy_coeff": 0.01}'"""
    logdir: str = "runs"
    """folder of the runs"""
    checkpoint_every: int = 0
    """save an RLlib checkpoint every N env steps (0: only at the end)"""
    resume: str | None = None
    """run folder to continue from its newest checkpoint, with the options it was started with; --total-timesteps,
    the resource and cluster options, --checkpoint-every, --eval-every and the comparison options may change"""
    eval_every: int = 0
    """log the test PPL of the agent every N env steps (0: never)"""


RESUMABLE_CHANGES = frozenset(
    {"total_timesteps", "resume", "logdir", "checkpoint_every", "eval_every", "compare", "eval_episodes",
     "timing_repeats", "num_env_runners", "num_envs_per_env_runner", "batched_envs", "num_cpus_per_env_runner",
     "num_gpus_per_env_runner", "num_gpus", "ray_address", "device"}
)  # fmt: skip
"""options a resumed run may be given with other values than it was started with"""


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The options of RLlibConfig, CompareConfig and the env's config (``--env``; the defaults as train_agent.py's)."""
    parser = argparse.ArgumentParser(
        prog="python -m agents.rllib", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_dataclass_arguments(
        parser,
        RLlibConfig,
        "training (Ray RLlib)",
        types={"total_timesteps": at_least(1), "num_env_runners": at_least(0), "num_envs_per_env_runner": at_least(1),
               "num_cpus_per_env_runner": at_least(1), "train_batch_size": at_least(1), "minibatch_size": at_least(1),
               "num_epochs": at_least(1), "checkpoint_every": at_least(0), "eval_every": at_least(0)},
    )  # fmt: skip
    preset, env_id = chosen_preset(argv)
    add_comparison_and_env_arguments(parser, preset, env_id)
    return parser


def ppo_hyperparameters(config: RLlibConfig) -> dict[str, Any]:
    """The keywords of ``PPOConfig.training()``: SB3's PPO defaults, the batch options, then ``--hyperparams``."""
    from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
    from ray.rllib.algorithms.ppo import PPOConfig

    values = {**SB3_PPO_DEFAULTS, "train_batch_size_per_learner": config.train_batch_size}
    values.update(minibatch_size=min(config.minibatch_size, config.train_batch_size), num_epochs=config.num_epochs)
    accepted = (set(inspect.signature(PPOConfig.training).parameters) | set(
        inspect.signature(AlgorithmConfig.training).parameters)) - {"self", "kwargs"}  # fmt: skip
    values.update(parse_hyperparams(config.hyperparams, accepted, "PPOConfig.training()"))
    return values


def make_masked_env(env_config: dict[str, Any]) -> gym.Env | gym.vector.VectorEnv:
    """The env creator registered with Ray: ``env_config["env_id"]`` with the rest as its arguments, mask inside.

    The id defaults to DRRL-Attention-v0. With ``num_envs`` in ``env_config`` (RLlib's ``vector_entry_point``
    mode): that many episodes of the native vector env, masks inside.
    """
    import drrl_env  # noqa: F401  (registers the ids in this env runner's process)

    env_id = dict(env_config).get("env_id", ENV_ID)
    kwargs = {name: value for name, value in dict(env_config).items() if name not in ("num_envs", "env_id")}
    if "num_envs" in dict(env_config):  # RLlib's vector_entry_point (--batched-envs): the native vector env
        envs = env_config["num_envs"]
        return MaskInVectorObservation(gym.make_vec(env_id, envs, vectorization_mode="vector_entry_point", **kwargs))
    return MaskInObservation(gym.make(env_id, **kwargs))


def build_algorithm(config: RLlibConfig, kwargs: dict[str, Any], env_id: str = ENV_ID) -> Any:
    """RLlib's PPO on the masked ``env_id``, with the action-masking module and the ``drrl/`` metrics callback."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec
    from ray.rllib.examples.rl_modules.classes.action_masking_rlm import ActionMaskingTorchRLModule
    from ray.tune.registry import register_env

    from agents.rllib_metrics import DRRLMetricsCallback

    register_env(ENV_NAME, make_masked_env)
    config = (
        PPOConfig()
        .environment(ENV_NAME, env_config={**kwargs, "env_id": env_id})
        .env_runners(
            num_env_runners=config.num_env_runners,
            num_envs_per_env_runner=config.num_envs_per_env_runner,
            num_cpus_per_env_runner=config.num_cpus_per_env_runner,
            num_gpus_per_env_runner=config.num_gpus_per_env_runner,
            gym_env_vectorize_mode="vector_entry_point" if config.batched_envs else "sync",
        )
        .learners(num_gpus_per_learner=config.num_gpus)
        .training(**ppo_hyperparameters(config))
        .rl_module(
            rl_module_spec=RLModuleSpec(
                module_class=ActionMaskingTorchRLModule, model_config=DefaultModelConfig(**MODEL_CONFIG)
            )
        )
        .callbacks(DRRLMetricsCallback)
        .debugging(seed=config.seed, log_level="ERROR")
    )
    return config.build_algo()


def steps_sampled(algorithm: Any) -> int:
    """Env steps sampled over the run (restored with a checkpoint)."""
    from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME

    return int(algorithm.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0))


def set_guardrail_step(algorithm: Any, step: int) -> None:
    """Eq. 11's clock: every env of every env runner gets the training step count (as the SB3 backend does)."""

    def apply(runner: Any) -> None:
        if getattr(runner, "env", None) is not None:
            runner.env.unwrapped.call("set_guardrail_step", step)

    algorithm.env_runner_group.foreach_env_runner(apply, local_env_runner=True)


def save_rllib_checkpoint(algorithm: Any, directory: Path, step: int) -> Path:
    """RLlib's checkpoint of ``algorithm`` as ``directory/step_N``, written to a temporary folder and renamed."""
    target = directory / f"{CHECKPOINT_PREFIX}{step:09d}"
    if target.exists():
        return target
    temporary = directory / f".{target.name}.partial"
    shutil.rmtree(temporary, ignore_errors=True)
    algorithm.save_to_path(str(temporary.resolve()))
    os.replace(temporary, target)
    return target


def latest_rllib_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint under ``directory`` (partial ones start with a dot and are skipped)."""
    found = sorted(directory.glob(f"{CHECKPOINT_PREFIX}*")) if directory.is_dir() else []
    return found[-1] if found else None


def _learner_module_keys() -> tuple[str, str, str]:
    """Where the learner group's state keeps the trained module: (learner, rl_module, module id)."""
    from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID

    return COMPONENT_LEARNER, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID


def warm_start(algorithm: Any, path: str, spaces: tuple[gym.Space, gym.Space]) -> None:
    """Load a behaviour-cloned SB3 agent file's weights into the learner's module and send them to the env runners."""
    learner, module, policy = _learner_module_keys()
    state = sb3_weights_as_rllib(path, build_module(*spaces, MODEL_CONFIG))
    weights = {name: tensor.numpy() for name, tensor in state.items()}
    algorithm.learner_group.set_state({learner: {module: {policy: weights}}})
    algorithm.env_runner_group.sync_weights(from_worker_or_learner_group=algorithm.learner_group, inference_only=True)


def trained_module(algorithm: Any, spaces: tuple[gym.Space, gym.Space]) -> Any:
    """A CPU copy of the learner's module (policy and value networks; env runners hold the policy only)."""
    keys = _learner_module_keys()
    weights = algorithm.learner_group.get_state(components="/".join(keys))
    learner, module_key, policy = keys
    module = build_module(*spaces, MODEL_CONFIG)
    module.set_state(weights[learner][module_key][policy])
    return module.eval()


def train(
    config: RLlibConfig,
    kwargs: dict[str, Any],
    spaces: tuple[gym.Space, gym.Space],
    run_dir: Path,
    env_id: str = ENV_ID,
) -> None:
    """Train until ``--total-timesteps``, logging each iteration; save checkpoints and the agent file."""
    from agents.rllib_metrics import TensorBoardResults

    algorithm = build_algorithm(config, kwargs, env_id)
    board = TensorBoardResults(run_dir)
    try:
        if config.resume:
            checkpoint = latest_rllib_checkpoint(run_dir / "checkpoints")
            if checkpoint is None:
                raise ValueError(f"--resume {run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}")
            algorithm.restore_from_path(str(checkpoint.resolve()))
            print(f"resuming {run_dir} from {checkpoint.name} ({steps_sampled(algorithm)} steps done)")
        else:
            board.hyperparameters({**dataclasses.asdict(config), **kwargs})
            if config.bc_model:
                warm_start(algorithm, config.bc_model, spaces)
                print(f"starting from the behaviour-cloned agent {config.bc_model}")
        done = steps_sampled(algorithm)
        next_checkpoint = (
            (done // config.checkpoint_every + 1) * config.checkpoint_every if config.checkpoint_every else 0
        )
        next_eval = (done // config.eval_every + 1) * config.eval_every if config.eval_every else 0
        with tqdm(total=config.total_timesteps, initial=done, desc="training (RLlib PPO)", unit="step") as bar:
            while done < config.total_timesteps:
                if env_id != KVCACHE_ENV_ID:  # the key-cache env has no guardrail
                    set_guardrail_step(algorithm, done)
                started = time.perf_counter()
                results = algorithm.train()
                now = steps_sampled(algorithm)
                board.iteration(results, now, time.perf_counter() - started, now - done)
                bar.update(now - done)
                done = now
                if config.checkpoint_every and done >= next_checkpoint:
                    save_rllib_checkpoint(algorithm, run_dir / "checkpoints", done)
                    next_checkpoint = (done // config.checkpoint_every + 1) * config.checkpoint_every
                if config.eval_every and done >= next_eval:
                    row = evaluate_policy(
                        RLlibPolicy(trained_module(algorithm, spaces), "agent"), kwargs, 1, timing_repeats=0
                    )
                    values = {"ppl": row.ppl, "flops_ratio": row.flops_ratio, "mean_rank": row.mean_rank}
                    board.scalars({f"eval/{name}": value for name, value in values.items()}, done)
                    next_eval = (done // config.eval_every + 1) * config.eval_every
        save_rllib_checkpoint(algorithm, run_dir / "checkpoints", done)
        path = save_rllib_agent(trained_module(algorithm, spaces), run_dir / "model.safetensors", MODEL_CONFIG, done)
        print(f"saved {path} ({done} steps); tensorboard --logdir {run_dir.parent}")
    finally:
        board.close()
        algorithm.stop()


def main(argv: list[str] | None = None) -> int:
    try:
        options = resume_options(build_parser(argv), argv, RESUMABLE_CHANGES, "python -m agents.rllib")
        config = dataclass_from_options(RLlibConfig, options)
        compare = dataclass_from_options(CompareConfig, options)
        require_rllib()
        check_output_folder(config.logdir, "--logdir")
        kwargs = env_kwargs(options)
        ppo_hyperparameters(config)
        if config.bc_model and not config.resume and not Path(config.bc_model).is_file():
            raise ValueError(f"--bc-model {config.bc_model}: no such file")
        env_id = options["env"]
        if env_id == KVCACHE_ENV_ID and (config.eval_every or config.batched_envs):
            raise ValueError(f"--eval-every and --batched-envs are for the DRRL-Attention ids, not {env_id}")
        probe = gym.make(env_id, **kwargs)  # the env's own checks, here rather than in every env runner
        spaces = (probe.observation_space, probe.action_space)
        probe.close()
        if config.bc_model and not config.resume:  # refused here, before Ray starts, if it does not fit
            sb3_weights_as_rllib(config.bc_model, build_module(*spaces, MODEL_CONFIG))
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    import ray

    if config.resume:
        run_dir = Path(config.resume)
    else:
        run_dir = Path(config.logdir) / f"{options['env']}__{ALGO}__{config.seed}__{int(time.time())}"
        run_dir.mkdir(parents=True, exist_ok=False)
        write_text_atomic(run_dir / "config.json", json.dumps(options, indent=2, default=str))
    ray.init(address=config.ray_address, include_dashboard=False, configure_logging=False)
    try:
        train(config, kwargs, spaces, run_dir, env_id)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    if compare.compare and env_id == KVCACHE_ENV_ID:
        policies = [make_kv_policy(spec, kwargs) for spec in compare.compare]
        policies.append(RLlibPolicy.from_file(run_dir / "model.safetensors"))
        policies[-1].name = f"{ALGO} (this run)"
        budgets = sorted(set(kwargs["cache_budget"]), reverse=True)
        print(kv_markdown_table(kv_comparison(policies, kwargs, compare.eval_episodes, budgets), kwargs))
    elif compare.compare:
        policies = [make_policy(spec, kwargs) for spec in compare.compare]
        policies.append(RLlibPolicy.from_file(run_dir / "model.safetensors"))
        policies[-1].name = f"{ALGO} (this run)"
        print(comparison_table(policies, kwargs, compare.eval_episodes, compare.timing_repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
