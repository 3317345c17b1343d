import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import drrl_env  # noqa: F401  (registers the env)
from agents.agent_file import load_agent_into, save_agent
from agents.algorithms import get_algorithm
from agents.bc import BCConfig, Demonstrations, behaviour_clone, load_demonstrations
from agents.networks import TransformerExtractor, policy_setup
from drrl_env.wrappers import StateHistory, stack_states
from oracle import GreedyOracle, record_trajectories
from tests.conftest import PAPER_MDP, layer_mdp


@pytest.fixture(scope="module")
def oracle_dataset(tmp_path_factory, tiny_layered_model_dir):
    """24 greedy-oracle episodes (2 layers x 4 segments) whose best rank depends on layer, segment and text."""
    kwargs = layer_mdp(
        model=tiny_layered_model_dir,
        ranks=(2, 4, 6, 8, 10, 12, 14, 16),
        seq_len=32,
        segment_len=8,
        beta=0.2,
        gamma=0.0,
        **{**PAPER_MDP, "guardrail": "off"},
    )
    directory = tmp_path_factory.mktemp("oracle") / "ds"
    record_trajectories(directory, GreedyOracle(), 24, kwargs, progress=False)
    return directory, kwargs


def test_stack_states_pads_and_flags():
    states = [np.full(3, float(i)) for i in range(1, 3)]
    window = stack_states(states, 4)
    assert window.shape == (4, 4)
    np.testing.assert_array_equal(window[:, -1], [0, 0, 1, 1])
    np.testing.assert_array_equal(window[2:, :3], [[1, 1, 1], [2, 2, 2]])
    assert not window[:2].any()
    np.testing.assert_array_equal(stack_states([np.ones(3)] * 6, 4)[:, -1], [1, 1, 1, 1])


def test_state_history_wrapper_and_transformer_extractor(tiny_env_kwargs):
    env = StateHistory(gym.make("DRRL-Attention-v0", **{**tiny_env_kwargs, "eps_decay": 0.0}), window=3)
    check_env(env, skip_render_check=True)
    obs, _ = env.reset(seed=0)
    first = obs.copy()
    assert obs.shape == env.observation_space.shape == (3, env.unwrapped.observation_space.shape[0] + 1)
    np.testing.assert_array_equal(obs[:, -1], [0, 0, 1])
    assert env.action_masks().shape == (4,)
    obs, *_ = env.step(3)
    np.testing.assert_array_equal(obs[1], first[2])  # the window slides
    extractor = TransformerExtractor(env.observation_space)
    features = extractor(torch.as_tensor(np.stack([first, obs])))
    assert features.shape == (2, extractor.features_dim)
    # the padding is masked: changing a padded row does not change the encoding
    altered = first.copy()
    altered[0, :-1] = 5.0
    torch.testing.assert_close(extractor(torch.as_tensor(altered[None])), extractor(torch.as_tensor(first[None])))
    # but an earlier real state does: the extractor attends over the history
    changed = obs.copy()
    changed[1, :-1] += 1.0
    assert not torch.allclose(extractor(torch.as_tensor(changed[None])), extractor(torch.as_tensor(obs[None])))


@pytest.mark.expensive
@pytest.mark.parametrize("policy", ["mlp", "transformer"])
def test_bc_agrees_with_the_oracle_on_held_out_episodes(oracle_dataset, policy):
    directory, _ = oracle_dataset
    demos = load_demonstrations(directory)
    held_out = demos.actions[demos.episodes >= 19]
    majority = np.bincount(held_out).max() / len(held_out)
    config = BCConfig(network=policy, epochs=120, validation_fraction=0.2)
    _, untrained = behaviour_clone(directory, BCConfig(network=policy, epochs=1, learning_rate=0.0), progress=False)
    _, result = behaviour_clone(directory, config, progress=False)
    assert result.train_loss[-1] < 0.5 * result.train_loss[0]
    assert result.train_accuracy[-1] >= 0.9
    # held-out text: the oracle's choice depends partly on the text, which 19 training episodes do not pin down
    assert result.val_accuracy[-1] >= max(0.75, majority + 0.1), (result.val_accuracy, majority)
    assert untrained.val_accuracy[-1] < 0.5


@pytest.mark.expensive
def test_bc_model_loads_into_maskable_ppo_and_trains_on(oracle_dataset, tmp_path):
    directory, kwargs = oracle_dataset
    model, _ = behaviour_clone(
        directory, BCConfig(network="transformer", epochs=5), logdir=tmp_path / "tb", progress=False
    )
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    path = save_agent(model, tmp_path / "bc")
    assert path.name == "bc.safetensors" and not list(tmp_path.glob(".bc*"))
    setup = policy_setup("transformer")
    env = setup.wrap(gym.make("DRRL-Attention-v0", **kwargs))
    loaded = get_algorithm("maskable_ppo").make(env, setup, seed=1, logdir=None, n_steps=64, batch_size=32)
    load_agent_into(loaded, path)
    observations = torch.as_tensor(load_demonstrations(directory, history=8).observations[:16])
    torch.testing.assert_close(
        loaded.policy.get_distribution(observations).distribution.logits,
        model.policy.get_distribution(observations).distribution.logits,
    )
    loaded.learn(256)
    assert loaded.num_timesteps >= 256


@pytest.mark.expensive
def test_bc_command(oracle_dataset, tmp_path):
    directory, _ = oracle_dataset
    help_text = subprocess.run(
        [sys.executable, "-m", "agents.bc", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--dataset", "--out", "--network", "--epochs"):
        assert flag in help_text
    out = tmp_path / "model"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "agents.bc",
            "--dataset",
            str(directory),
            "--out",
            str(out),
            "--epochs",
            "3",
            "--logdir",
            str(tmp_path / "tb"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "model.safetensors").is_file() and "held-out agreement" in done.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "agents.bc", "--dataset", str(tmp_path / "nope"), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "holds no trajectory dataset" in missing.stderr


def test_entropy_bonus_keeps_the_cloned_policy_stochastic(oracle_dataset):
    directory, _ = oracle_dataset
    observations = torch.as_tensor(load_demonstrations(directory).observations)

    def entropy(coef):
        model, _ = behaviour_clone(directory, BCConfig(epochs=30, entropy_coef=coef), progress=False)
        with torch.no_grad():
            return float(model.policy.get_distribution(observations).entropy().mean())

    assert entropy(0.5) > 1.5 * entropy(0.0)


@pytest.mark.expensive
def test_per_head_hindsight_dataset_and_bc(tmp_path, tiny_layered_model_dir):
    """Per-head ranks: the dataset keeps one action per key/value group, and BC clones the MultiDiscrete choice."""
    from oracle.hindsight import HindsightOracle

    kwargs = layer_mdp(
        model=tiny_layered_model_dir, ranks=(2, 4, 8, 12, 16), seq_len=32, batch_size=2, device="cpu",
        guardrail="off", per_head=True, flops_budget=0.5, sensitivity_samples=4,
    )  # fmt: skip
    data = record_trajectories(tmp_path / "ds", HindsightOracle("fisher", samples=4), 24, kwargs, progress=False)
    assert len(data) == 24 * 2 and len(data[0]["action"]) == len(data[0]["rank"]) == 2
    demos = load_demonstrations(tmp_path / "ds")
    assert demos.actions.shape == (48, 2) and demos.masks.shape == (48, 2 * 5)
    ranks = np.asarray(kwargs["ranks"])
    np.testing.assert_array_equal(ranks[demos.actions], np.stack(data.with_format("numpy")["rank"]))
    assert len(np.unique(demos.actions)) > 1  # the groups' allocations differ
    _, untrained = behaviour_clone(tmp_path / "ds", BCConfig(epochs=1, learning_rate=0.0), progress=False)
    model, result = behaviour_clone(tmp_path / "ds", BCConfig(epochs=100), progress=False)
    assert result.train_loss[-1] < 0.5 * result.train_loss[0]
    assert result.val_accuracy[-1] >= max(0.8, untrained.val_accuracy[-1] + 0.3), (result.val_accuracy, untrained)
    env = gym.make("DRRL-Attention-v0", **kwargs)
    observation, _ = env.reset(seed=0)
    action, _ = model.predict(observation, action_masks=env.unwrapped.action_masks(), deterministic=True)
    assert action.shape == (2,)


def test_validation_holds_out_whole_prompts_where_episodes_share_them():
    """Episodes of a prompt pool share the prompt's statistics: validation holds out prompts, else episodes."""
    episodes = np.repeat(np.arange(8), 3)  # 8 episodes of 3 steps
    prompts = np.repeat(np.array([0, 1, 2, 3, 0, 1, 2, 3]), 3)  # each prompt played twice
    demos = Demonstrations(np.zeros((24, 2)), np.ones((24, 4), bool), np.zeros(24, np.int64), episodes, prompts)
    train, validation, unit = demos.held_out_rows(0.25)
    assert unit == "prompts" and set(prompts[validation]) == {3} and 3 not in set(prompts[train])
    assert len(train) + len(validation) == 24 and len(validation) == 6
    no_pool = Demonstrations(demos.observations, demos.masks, demos.actions, episodes, np.full(24, -1))
    train, validation, unit = no_pool.held_out_rows(0.25)
    assert unit == "episodes" and set(episodes[validation]) == {6, 7}
    one_prompt = Demonstrations(demos.observations, demos.masks, demos.actions, episodes, np.zeros(24, np.int64))
    assert one_prompt.held_out_rows(0.25)[2] == "episodes"  # one prompt cannot be split: its episodes are
    with pytest.raises(ValueError, match="holds 1 episode"):
        Demonstrations(demos.observations[:3], demos.masks[:3], demos.actions[:3], episodes[:3]).held_out_rows(0.2)
