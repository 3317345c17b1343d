"""The RLlib backend: the masked-observation wrapper, RLlib agent files, and training with 1 then 2 env runners."""

import json
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env

import drrl_env  # noqa: F401  (registers the env)
from drrl_env.wrappers import MaskInObservation, mask_observation_space
from tests.conftest import LAYER_MDP, ROOT, TINY_SIZES, layer_mdp

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def tiny_kwargs(tiny_model_dir):
    return layer_mdp(
        model=tiny_model_dir, ranks=(4, 8, 12, 16), seq_len=32, segment_len=8, flops_budget=0.5, guardrail="off"
    )


def rllib():
    return pytest.importorskip("ray.rllib", reason="the drrl[rllib] extra (Ray RLlib) is not installed")


# ----------------------------------------------------------------- the wrapper (no Ray needed)
@pytest.mark.parametrize("per_head", [False, True])
def test_mask_in_observation_carries_the_env_mask(tiny_kwargs, per_head):
    env = MaskInObservation(gym.make("DRRL-Attention-v0", **{**tiny_kwargs, "per_head": per_head}))
    check_env(env.unwrapped)
    logits = 4 * env.unwrapped.kv_heads if per_head else 4
    assert env.observation_space["action_mask"].shape == (logits,)
    observation, _ = env.reset(seed=0)
    assert env.observation_space.contains(observation)
    masked_steps, terminated = 0, False
    while not terminated:
        assert np.array_equal(observation["action_mask"], env.unwrapped.action_masks().astype(np.float32))
        masked_steps += int(observation["action_mask"].min() == 0)
        groups = observation["action_mask"].reshape(-1, 4)
        action = groups.argmax(-1)  # the lowest allowed rank per group, but the highest in group 0:
        action[0] = 3 - groups[0, ::-1].argmax()  # within budget, since each group's mask has the others at min
        observation, _, terminated, _, info = env.step(action if per_head else int(action[0]))
        assert not info["masked_violation"]
        assert env.observation_space.contains(observation)
    assert masked_steps > 0  # the budget did mask ranks: the test sees masks at work
    assert observation["action_mask"].min() == 1.0  # terminal: no action follows, the distribution stays defined


def test_mask_observation_space_refuses_continuous_actions():
    with pytest.raises(TypeError, match="Discrete or MultiDiscrete"):
        mask_observation_space(spaces.Box(0, 1, (3,)), spaces.Box(0, 1, (2,)))


# ----------------------------------------------------------------- agent files and the zoo
def test_rllib_agent_file_round_trip_and_masked_greedy_actions(tmp_path):
    rllib()
    from agents.agent_file import AgentFileError
    from agents.rllib_agent import MODEL_CONFIG, build_module, greedy_actions, load_rllib_module, save_rllib_agent

    torch.manual_seed(0)
    observation_space = spaces.Box(-np.inf, np.inf, (6,), np.float32)
    for action_space in (spaces.Discrete(5), spaces.MultiDiscrete([3, 3])):
        module = build_module(observation_space, action_space, MODEL_CONFIG)
        path = save_rllib_agent(module, tmp_path / "agent.safetensors", MODEL_CONFIG, num_timesteps=7)
        loaded, description = load_rllib_module(path)
        assert description["num_timesteps"] == 7 and description["algo"] == "rllib_ppo"
        observations = np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32)
        logits = int(np.sum(getattr(action_space, "nvec", [getattr(action_space, "n", 0)])))
        masks = (np.random.default_rng(1).random((64, logits)) < 0.5).astype(np.float32)
        blocks = np.split(masks, np.cumsum(getattr(action_space, "nvec", [logits]))[:-1], axis=1)
        for block in blocks:
            block[np.arange(64), np.random.default_rng(2).integers(block.shape[1], size=64)] = 1.0  # one allowed
        actions = greedy_actions(loaded, observations, masks)
        assert np.array_equal(actions, greedy_actions(module, observations, masks))
        actions = actions.reshape(64, -1)
        for group, block in enumerate(blocks):
            assert block[np.arange(64), actions[:, group]].min() == 1.0  # never a masked action
    torch.save({}, tmp_path / "not_an_agent.pt")
    with pytest.raises(AgentFileError, match="not a readable RLlib agent file"):
        load_rllib_module(tmp_path / "not_an_agent.pt")


def test_zoo_loads_rllib_agent_files_and_sb3_ones_stay_sb3(tmp_path, tiny_kwargs):
    rllib()
    from sb3_contrib import MaskablePPO

    from agents.agent_file import save_agent
    from agents.rllib_agent import MODEL_CONFIG, RLlibPolicy, build_module, is_rllib_agent, save_rllib_agent
    from agents.zoo import make_policy

    env = gym.make("DRRL-Attention-v0", **tiny_kwargs)
    rllib_path = save_rllib_agent(
        build_module(env.observation_space, env.action_space, MODEL_CONFIG), tmp_path / "r.safetensors", MODEL_CONFIG, 0
    )
    sb3_path = save_agent(MaskablePPO("MlpPolicy", env, seed=0), tmp_path / "s.safetensors")
    assert is_rllib_agent(rllib_path) and not is_rllib_agent(sb3_path) and not is_rllib_agent(tmp_path / "none")
    policy = make_policy(str(rllib_path), tiny_kwargs)
    assert isinstance(policy, RLlibPolicy) and policy.name == "rllib_ppo:r" and policy.flops_per_decision > 0
    assert not isinstance(make_policy(str(sb3_path), tiny_kwargs), RLlibPolicy)
    observation, info = env.reset(seed=0)
    action = policy.act(observation, info["action_mask"], env.unwrapped)
    assert isinstance(action, int) and info["action_mask"][action]


@pytest.mark.expensive
def test_a_behaviour_cloned_sb3_agent_warm_starts_rllib(tiny_kwargs, tmp_path):
    rllib()
    import ray
    from sb3_contrib import MaskablePPO

    from agents.agent_file import AgentFileError, save_agent
    from agents.rllib import RLlibConfig, build_algorithm, build_parser, trained_module, warm_start
    from agents.rllib_agent import MODEL_CONFIG, build_module, greedy_actions, sb3_weights_as_rllib
    from drrl_env.cli import dataclass_from_options

    env = gym.make("DRRL-Attention-v0", **tiny_kwargs)
    spaces_ = (env.observation_space, env.action_space)
    sb3 = MaskablePPO("MlpPolicy", env, seed=3)
    path = save_agent(sb3, tmp_path / "bc.safetensors")
    args = build_parser().parse_args(["--num-env-runners", "0", "--train-batch-size", "16", "--minibatch-size", "8"])
    ray.init(num_cpus=1, include_dashboard=False, configure_logging=False)
    try:
        algorithm = build_algorithm(dataclass_from_options(RLlibConfig, vars(args)), tiny_kwargs)
        warm_start(algorithm, str(path), spaces_)
        learner = trained_module(algorithm, spaces_)
        runner = algorithm.env_runner.module  # the sampling side got the weights too
        algorithm.stop()
    finally:
        ray.shutdown()
    expected = sb3_weights_as_rllib(path, build_module(*spaces_, MODEL_CONFIG))
    for name, tensor in learner.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    rng = np.random.default_rng(0)
    observations = rng.normal(size=(64, env.observation_space.shape[0])).astype(np.float32)
    masks = (rng.random((64, 4)) < 0.6).astype(np.float32)
    masks[:, 0] = 1.0
    sb3_actions = [
        sb3.policy.predict(o, action_masks=m.astype(bool), deterministic=True)[0]
        for o, m in zip(observations, masks, strict=True)
    ]
    assert np.array_equal(greedy_actions(runner, observations, masks), np.array(sb3_actions).reshape(-1))
    other = save_agent(MaskablePPO("MlpPolicy", env, seed=0, policy_kwargs={"net_arch": [32]}), tmp_path / "o")
    with pytest.raises(AgentFileError, match="has no place in the RLlib module"):
        sb3_weights_as_rllib(other, build_module(*spaces_, MODEL_CONFIG))


# ----------------------------------------------------------------- training
def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=ENV)


@pytest.mark.expensive
def test_help_and_clear_errors(tmp_path):
    out = run("-m", "agents.rllib", "--help")
    assert out.returncode == 0
    flags = ("--num-env-runners", "--num-envs-per-env-runner", "--num-gpus", "--ray-address", "--resume",
             "--total-timesteps", "--seed", "--flops-budget", "--hyperparams", "--checkpoint-every")  # fmt: skip
    for flag in flags:
        assert flag in out.stdout, flag
    rllib()
    out = run("-m", "agents.rllib", "--hyperparams", '{"learning_rate": 1}', "--logdir", str(tmp_path))
    assert out.returncode == 2 and "PPOConfig.training() takes no ['learning_rate']" in out.stderr
    out = run("-m", "agents.rllib", "--resume", str(tmp_path))
    assert out.returncode == 2 and "not a run folder of python -m agents.rllib" in out.stderr


@pytest.mark.expensive
def test_without_the_extra_the_error_names_the_install_command(tmp_path):
    code = (
        "import sys; sys.modules['ray'] = None; from agents.rllib import main; "
        f"raise SystemExit(main(['--logdir', {str(tmp_path)!r}]))"
    )
    out = run("-c", code)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (
        "error: the RLlib backend needs Ray RLlib, an optional extra: "
        "pip install 'drrl[rllib]' (from a clone: pip install -e '.[rllib]')"
    )


def scalars(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


@pytest.mark.expensive
def test_training_with_one_then_two_env_runners(tiny_kwargs, tmp_path):
    rllib()
    from agents.rllib_agent import RLlibPolicy, greedy_actions

    options = ["--env", "DRRL-Attention-PerLayer-v0", "--model", tiny_kwargs["model"], "--ranks", "4", "8", "12", "16",
               "--seq-len", "32",
               "--segment-len", "8", "--flops-budget", "0.5", "--device", "cpu", "--train-batch-size", "64",
               "--minibatch-size", "32", "--num-epochs", "2", "--compare", "--logdir", str(tmp_path)]  # fmt: skip
    out = run("-m", "agents.rllib", *options, "--num-env-runners", "1", "--total-timesteps", "192",
              "--checkpoint-every", "128")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = tmp_path.glob("DRRL-Attention-PerLayer-v0__rllib_ppo__0__*")
    assert json.loads((run_dir / "config.json").read_text())["num_env_runners"] == 1
    out = run(
        "-m",
        "agents.rllib",
        "--resume",
        str(run_dir),
        "--num-env-runners",
        "2",
        "--total-timesteps",
        "384",
        "--num-envs-per-env-runner",
        "2",
        "--batched-envs",
    )  # each runner's 2 episodes: one batched forward
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming" in out.stdout and "(192 steps done)" in out.stdout
    checkpoints = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step_000000128", "step_000000192", "step_000000256", "step_000000384"]

    # the metrics reached TensorBoard, from both runs; masked ranks were never sampled, and masks were at work
    assert len(scalars(run_dir, "rollout/ep_rew_mean")) == 6
    assert scalars(run_dir, "drrl/violation_rate") == [0.0] * 6
    assert max(scalars(run_dir, "drrl/budget_mask_rate")) > 0.1
    assert len(scalars(run_dir, "train/policy_loss")) == 6 and scalars(run_dir, "drrl/flops_saved")

    # the last checkpoint (RLlib's own format, a pickle: only with trust_pickle) restores to the saved agent's policy
    from agents.agent_file import AgentFileError
    from agents.zoo import make_policy

    checkpoint = str(run_dir / "checkpoints/step_000000384")
    with pytest.raises(AgentFileError, match="--trust-pickle"):
        make_policy(checkpoint, tiny_kwargs)
    restored = make_policy(checkpoint, tiny_kwargs, trust_pickle=True)
    agent = make_policy(str(run_dir / "model.safetensors"), tiny_kwargs)
    assert isinstance(restored, RLlibPolicy) and isinstance(agent, RLlibPolicy)
    rng = np.random.default_rng(0)
    observations = rng.normal(size=(32, agent.module.observation_space["observations"].shape[0])).astype(np.float32)
    masks = np.ones((32, 4), np.float32)
    masks[:16, 2:] = 0.0
    actions = greedy_actions(agent.module, observations, masks)
    assert np.array_equal(greedy_actions(restored.module, observations, masks), actions)
    assert actions[:16].max() <= 1


def test_rllibs_masked_vector_env(tiny_model_dir):
    from agents.rllib import make_masked_env
    from drrl_env.vector import DRRLAttentionVectorEnv
    from drrl_env.wrappers import MaskInVectorObservation

    kwargs = dict(model=tiny_model_dir, **TINY_SIZES, **LAYER_MDP)
    envs = make_masked_env({**kwargs, "num_envs": 2})  # what RLlib's vector_entry_point mode calls
    assert isinstance(envs, MaskInVectorObservation) and isinstance(envs.unwrapped, DRRLAttentionVectorEnv)
    observations, _ = envs.reset(seed=0)
    assert envs.observation_space.contains(observations)
    np.testing.assert_array_equal(observations["action_mask"], envs.unwrapped.action_masks().astype(np.float32))
    length = envs.unwrapped.envs[0].num_layers * envs.unwrapped.envs[0].num_segments
    for _ in range(length):
        observations, _, terminated, _, _ = envs.step(envs.unwrapped.action_masks().argmax(axis=1))
    assert terminated.all() and (observations["action_mask"] == 1.0).all()  # defined distributions after the end
    envs.close()


@pytest.mark.expensive
def test_rllib_trains_in_the_key_cache_env(tiny_kwargs, tmp_path):
    rllib()
    options = ["--env", "DRRL-KVCache-v0", "--model", tiny_kwargs["model"], "--context", "48", "--prompts", "2",
               "--observe-tokens", "8", "--horizon", "8", "--ranks", "4", "8", "12", "16", "--recent-tokens", "4",
               "--cache-budget", "0.6", "0.75", "--num-env-runners", "0", "--train-batch-size", "16",
               "--minibatch-size", "8", "--num-epochs", "1", "--total-timesteps", "16", "--eval-episodes", "1",
               "--compare", "uniform", "static", "--logdir", str(tmp_path)]  # fmt: skip
    out = run("-m", "agents.rllib", *options)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = tmp_path.glob("DRRL-KVCache-v0__rllib_ppo__0__*")
    assert (run_dir / "model.safetensors").is_file()
    rows = [line.split("|")[2].strip() for line in out.stdout.splitlines() if line.startswith("| 0.")]
    assert rows == ["uniform", "static", "rllib_ppo (this run)"] * 2  # at both budgets
    assert scalars(run_dir, "rollout/ep_rew_mean")
