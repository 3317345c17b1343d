"""The native vector env: N episodes through one batched forward pass, each the episode a single env would run."""

import gymnasium as gym
import numpy as np
import pytest

import drrl_env  # noqa: F401 - registers the ids
from drrl_env.vector import DRRLAttentionVectorEnv
from tests.conftest import LAYER_MDP, TINY_SIZES

CONFIGS = {
    "per layer, separate, kl reward": dict(LAYER_MDP),
    "per head, joint, budget range, Eq. S signal": dict(
        per_head=True, spectral_mode="joint", flops_budget=(0.5, 0.75), sensitivity_samples=2, guardrail="off"
    ),
    "paper MDP: eq13 reward, eq9 guardrail": dict(
        per_head=False, flops_budget=None, reward="eq13", guardrail="eq9", eps0=0.5, sensitivity_samples=0
    ),
}


def greedy_action(mask: np.ndarray, kv_heads: int, per_head: bool) -> np.ndarray | int:
    """The largest allowed candidate (per group with per-head ranks): a deterministic policy that reads the mask."""
    if not per_head:
        return int(np.flatnonzero(mask)[-1])
    return np.array([np.flatnonzero(group)[-1] for group in mask.reshape(kv_heads, -1)])


def play(env, action_of, steps: int) -> list[tuple]:
    trace = []
    for _ in range(steps):
        observation, reward, terminated, truncated, info = env.step(action_of())
        trace.append((observation, reward, terminated, info))
    return trace


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_episode_is_the_single_envs_episode(name, tiny_model_dir):
    kwargs = dict(model=tiny_model_dir, **TINY_SIZES, **CONFIGS[name])
    n, seed = 3, 7
    vector = gym.make_vec("DRRL-Attention-v0", num_envs=n, vectorization_mode="vector_entry_point", **kwargs)
    assert isinstance(vector, DRRLAttentionVectorEnv)
    singles = [gym.make("DRRL-Attention-v0", **kwargs).unwrapped for _ in range(n)]
    first = singles[0]
    per_head, kv_heads, length = first.config.per_head, first.kv_heads, first.num_layers * first.num_segments

    observations, infos = vector.reset(seed=seed)
    for i, single in enumerate(singles):
        observation, info = single.reset(seed=seed + i)
        np.testing.assert_allclose(observations[i], observation, rtol=1e-5, atol=1e-6)
        assert infos["episode_seed"][i] == info["episode_seed"] and infos["budget"][i] == info["budget"]
        np.testing.assert_array_equal(infos["action_mask"][i], info["action_mask"])
    assert len({int(s) for s in infos["episode_seed"]}) == n  # n different batches

    for step in range(length + 1):  # the last step runs the autoreset
        if step < length:
            masks = vector.action_masks()
            actions = [greedy_action(mask, kv_heads, per_head) for mask in masks]
        else:  # the episodes have ended: the autoreset step ignores its actions
            actions = list(vector.action_space.sample())
        observations, rewards, terminated, truncated, infos = vector.step(np.array(actions))
        assert not truncated.any()
        for i, single in enumerate(singles):
            if step == length:  # NEXT_STEP autoreset: each env's next episode, as single.reset() draws it
                observation, info = single.reset()
                reward, ended = 0.0, False
            else:
                np.testing.assert_array_equal(masks[i], single.action_masks())
                observation, reward, ended, _, info = single.step(actions[i])
                assert infos["rank"][i] == info["rank"] if not per_head else list(infos["rank"][i]) == info["rank"]
            np.testing.assert_allclose(observations[i], observation, rtol=1e-5, atol=1e-6)
            assert rewards[i] == pytest.approx(reward, rel=1e-4, abs=1e-6) and terminated[i] == ended
        assert terminated.all() == (step == length - 1)  # lockstep: every episode ends on the same step
    for i, single in enumerate(singles):  # the records replay the same episodes
        assert vector.envs[i].episode_record()["episode_seed"] == single.episode_record()["episode_seed"]
    vector.close()


def test_seeds_spaces_and_errors(tiny_model_dir):
    kwargs = dict(model=tiny_model_dir, **TINY_SIZES, **LAYER_MDP)
    vector = gym.make_vec("DRRL-Attention-v0", num_envs=2, **kwargs)  # the vector entry point is the default
    assert isinstance(vector, DRRLAttentionVectorEnv)
    assert vector.observation_space.shape == (2, *vector.single_observation_space.shape)
    first, _ = vector.reset(seed=[3, 4])
    again, _ = vector.reset(seed=3)  # 3 and 3 + 1
    np.testing.assert_array_equal(first, again)
    assert vector.observation_space.contains(first)
    assert vector.call("budget_share") == (vector.envs[0].budget_share, vector.envs[1].budget_share)
    with pytest.raises(ValueError, match="step needs 2 actions"):
        vector.step(np.array([0]))
    with pytest.raises(ValueError, match="action"):
        vector.step(np.array([0, 99]))
    with pytest.raises(ValueError, match="2 seeds"):
        vector.reset(seed=[1, 2, 3])
    with pytest.raises(ValueError, match="num_envs must be an integer >= 1"):
        DRRLAttentionVectorEnv(num_envs=0, **kwargs)
    vector.close()
