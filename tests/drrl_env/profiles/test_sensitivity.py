"""The observation's ``sensitivity`` part: the input's Fisher profile, as the env shows it to the agent."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import drrl_env  # noqa: F401 - registers DRRL-Attention-v0
from drrl_env.config import EnvConfig
from drrl_env.profiles.sensitivity import SENSITIVITY_FLOOR, fisher_kl_profile, sensitivity_features, sensitivity_width
from drrl_env.profiles.waterfill import allocate_ranks, rank_shares
from oracle.hindsight import HindsightOracle
from tests.conftest import layer_mdp

RANKS = (2, 4, 8, 12, 16)


def test_features_are_the_rows_and_the_replanned_water_fill():
    rng = np.random.default_rng(0)
    profile = np.sort(rng.exponential(1e-3, (4, 5)), axis=1)[:, ::-1].copy()  # cost falls with rank
    profile[:, -1] = 0.0
    shares = rank_shares(RANKS, 16)
    for layer in range(4):
        for left in (0.2, 0.5, 0.9):
            features = sensitivity_features(profile, layer, shares, left)
            assert features.shape == (sensitivity_width(5),) == (15,)
            np.testing.assert_allclose(features[:5], np.log10(profile[layer] + SENSITIVITY_FLOOR))
            later = profile[layer + 1 :].sum(axis=0) if layer < 3 else np.zeros(5)
            np.testing.assert_allclose(features[5:10], np.log10(later + SENSITIVITY_FLOOR))
            expected = np.eye(5)[allocate_ranks(profile[layer:], shares, left)[0]]
            np.testing.assert_array_equal(features[10:], expected)
    assert sensitivity_features(profile, 0, shares, 1.0)[10:].argmax() == 4  # no budget: full rank
    assert sensitivity_features(profile, 3, shares, 0.01)[10:].argmax() == 0  # below the smallest: the smallest


def test_per_unit_features_are_each_units_rows_and_the_water_fill_over_units():
    rng = np.random.default_rng(1)
    profile = np.sort(rng.exponential(1e-3, (4, 3, 5)), axis=2)[:, :, ::-1].copy()  # (L, U, K)
    profile[..., -1] = 0.0
    shares = rank_shares(RANKS, 16)
    for layer in range(4):
        features = sensitivity_features(profile, layer, shares, 0.5)
        assert features.shape == (sensitivity_width(5, 3),) == (45,)
        np.testing.assert_allclose(features[:15], np.log10(profile[layer] + SENSITIVITY_FLOOR).ravel())
        later = profile[layer + 1 :].sum(axis=0)
        np.testing.assert_allclose(features[15:30], np.log10(later + SENSITIVITY_FLOOR).ravel())
        chosen = allocate_ranks(profile[layer:].reshape(-1, 5), shares, 0.5)[:3]
        np.testing.assert_array_equal(features[30:].reshape(3, 5), np.eye(5)[chosen])
    one_unit = sensitivity_features(profile[:, :1], 1, shares, 0.5)
    np.testing.assert_array_equal(one_unit, sensitivity_features(profile[:, 0], 1, shares, 0.5))


def test_per_head_env_shows_each_groups_profile(tiny_layered_model_dir):
    kwargs = layer_mdp(model=tiny_layered_model_dir, ranks=RANKS, seq_len=32, batch_size=2, per_head=True)
    env = gym.make(
        "DRRL-Attention-v0",
        **{**kwargs, "device": "cpu", "guardrail": "off", "sensitivity_samples": 2, "flops_budget": 0.5},
    ).unwrapped
    assert env.observation_slices["sensitivity"].stop - env.observation_slices["sensitivity"].start == 3 * 5 * 2
    observation, _ = env.reset(seed=2)
    profile = env.sensitivity_profile
    expected = fisher_kl_profile(env.loaded, env.input_ids, RANKS, "separate", samples=2, per_head=True)
    np.testing.assert_array_equal(profile, expected)
    terminated = False
    while not terminated:
        layer, budget_left = env.attention_call.layer, observation[env.observation_slices["budget"]][1]
        np.testing.assert_allclose(
            observation[env.observation_slices["sensitivity"]],
            sensitivity_features(profile, layer, rank_shares(RANKS, 16), float(budget_left)),
            rtol=1e-5,
        )
        mask = env.action_masks().reshape(env.kv_heads, len(RANKS))
        observation, _, terminated, _, _ = env.step(np.array([np.flatnonzero(row)[0] for row in mask]))
    check_env(env)


def test_water_fill_share_follows_the_costs():
    """The layer whose costs are far larger than the later layers' keeps a larger rank than the cheap one."""
    shares = rank_shares(RANKS, 16)
    costly, cheap = np.array([1.0, 0.5, 0.1, 0.01, 0.0]), np.array([1e-5, 5e-6, 1e-6, 1e-7, 0.0])
    assert shares[sensitivity_features(np.stack([costly, cheap, cheap]), 0, shares, 0.5)[10:].argmax()] > 0.5
    assert shares[sensitivity_features(np.stack([cheap, costly, costly]), 0, shares, 0.5)[10:].argmax()] < 0.5


@pytest.mark.expensive
@pytest.mark.parametrize("segment_len", [None, 8])
def test_env_shows_the_episode_profile(tiny_layered_model_dir, segment_len):
    kwargs = layer_mdp(model=tiny_layered_model_dir, ranks=RANKS, seq_len=32, batch_size=2, segment_len=segment_len)
    kwargs.update(device="cpu", guardrail="off", spectral_mode="joint", sensitivity_samples=3)
    env = gym.make("DRRL-Attention-v0", **kwargs).unwrapped
    plain = gym.make("DRRL-Attention-v0", **{**kwargs, "sensitivity_samples": 0}).unwrapped
    assert env.observation_space.shape[0] == plain.observation_space.shape[0] + sensitivity_width(len(RANKS))
    assert "sensitivity" not in plain.observation_slices
    observation, info = env.reset(seed=5)
    plain_observation, plain_info = plain.reset(seed=5)
    weights = sum(parameter.numel() for parameter in env.loaded.model.parameters())
    assert info["flops_sensitivity"] == 2.0 * weights * 64 * (1 + 2 * 3) and plain_info["flops_sensitivity"] == 0
    assert plain.sensitivity_profile is None
    profile = env.sensitivity_profile
    expected = fisher_kl_profile(env.loaded, env.input_ids, RANKS, "joint", segment_len, samples=3)
    np.testing.assert_array_equal(profile, expected)  # the same seed: the same label samples
    assert (profile[:, 0] > profile[:, -1]).all() and (profile[:, -1] == 0).all()
    terminated = False
    while not terminated:
        part = observation[env.observation_slices["sensitivity"]]
        layer, budget_left = env.attention_call.layer, observation[env.observation_slices["budget"]][1]
        np.testing.assert_allclose(
            part, sensitivity_features(profile, layer, rank_shares(RANKS, 16), float(budget_left)), rtol=1e-5
        )
        common = slice(0, env.observation_slices["sensitivity"].start)
        np.testing.assert_array_equal(observation[common], plain_observation)  # the other parts as without it
        action = int(env.action_masks().nonzero()[0][-1])
        observation, _, terminated, _, _ = env.step(action)
        plain_observation, *_ = plain.step(action)
    check_env(env)


def test_hindsight_reuses_the_env_profile(tiny_layered_model_dir):
    kwargs = layer_mdp(
        model=tiny_layered_model_dir, ranks=RANKS, seq_len=32, batch_size=2, device="cpu", guardrail="off"
    )
    for samples, reused in ((2, True), (3, False)):
        env = gym.make("DRRL-Attention-v0", **{**kwargs, "sensitivity_samples": samples}).unwrapped
        observation, _ = env.reset(seed=1)
        policy = HindsightOracle("fisher", samples=2)
        policy.act(observation, env.action_masks(), env)
        assert (policy.last_profile is env.sensitivity_profile) is reused
        if not reused:
            expected = fisher_kl_profile(env.loaded, env.input_ids, RANKS, "separate", samples=2)
            np.testing.assert_array_equal(policy.last_profile, expected)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "4"])
def test_sensitivity_samples_is_checked(bad):
    with pytest.raises(ValueError, match="sensitivity_samples must be an integer >= 0"):
        EnvConfig(sensitivity_samples=bad)
