"""``--vec batched``: the native vector env under SB3, on the episodes ``--vec sync`` runs."""

import numpy as np
import pytest
from sb3_contrib.common.maskable.utils import get_action_masks

from agents.networks import policy_setup
from agents.training import make_vec_env
from tests.conftest import LAYER_MDP, TINY_SIZES


def test_batched_runs_the_episodes_sync_runs(tiny_model_dir):
    kwargs = dict(model=tiny_model_dir, **TINY_SIZES, **LAYER_MDP)
    batched = make_vec_env(kwargs, policy_setup("mlp"), n_envs=2, seed=5, vec="batched")
    sync = make_vec_env(kwargs, policy_setup("mlp"), n_envs=2, seed=5, vec="sync")
    length = batched.get_attr("num_layers")[0] * batched.get_attr("num_segments")[0]
    np.testing.assert_allclose(batched.reset(), sync.reset(), rtol=1e-5, atol=1e-6)
    for step in range(2 * length):  # two episodes: the second one's seeds too
        masks = get_action_masks(batched)
        np.testing.assert_array_equal(masks, get_action_masks(sync))
        allowed = [np.flatnonzero(mask) for mask in masks]
        actions = np.array([a[-1 - (i + step) % len(a)] for i, a in enumerate(allowed)])  # not all the same rank
        observations, rewards, dones, infos = batched.step(actions)
        expected_observations, expected_rewards, expected_dones, expected_infos = sync.step(actions)
        np.testing.assert_allclose(observations, expected_observations, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rewards, expected_rewards, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(dones, expected_dones)
        if dones.all():
            for info, expected in zip(infos, expected_infos, strict=True):
                assert info["episode"]["r"] == pytest.approx(expected["episode"]["r"], rel=1e-4, abs=1e-6)
                np.testing.assert_allclose(info["terminal_observation"], expected["terminal_observation"], atol=1e-6)
    assert batched.env_method("get_position") == sync.env_method("get_position")
    batched.close()
    sync.close()


def test_maskable_ppo_trains_on_the_batched_env_and_wrappers_are_refused(tiny_model_dir):
    from sb3_contrib import MaskablePPO

    kwargs = dict(model=tiny_model_dir, **TINY_SIZES, **LAYER_MDP)
    env = make_vec_env(kwargs, policy_setup("mlp"), n_envs=2, seed=0, vec="batched")
    model = MaskablePPO("MlpPolicy", env, n_steps=12, batch_size=12, n_epochs=1, seed=0)
    model.learn(48)
    assert model.num_timesteps >= 48 and len(model.ep_info_buffer) >= 2  # VecMonitor saw whole episodes
    env.close()
    with pytest.raises(ValueError, match="--vec batched runs the episodes without per-env wrappers; the transformer"):
        make_vec_env(kwargs, policy_setup("transformer", 4), n_envs=2, seed=0, vec="batched")
    from stable_baselines3.common.vec_env import DummyVecEnv

    from agents.vec_env import BatchedVecEnv

    for setup, n_envs, expected in ((policy_setup("mlp"), 2, BatchedVecEnv), (policy_setup("mlp"), 1, DummyVecEnv),
                                    (policy_setup("transformer", 4), 2, DummyVecEnv)):  # fmt: skip
        auto = make_vec_env(kwargs, setup, n_envs=n_envs, seed=0)  # --vec auto, the default
        assert isinstance(auto.unwrapped, expected), (setup.name, n_envs)
        auto.close()
