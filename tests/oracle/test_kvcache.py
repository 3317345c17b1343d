"""The KV-cache env's fixed rules, teacher and ceiling (oracle.kvcache), on a tiny model."""

import gymnasium as gym
import numpy as np
import pytest

import drrl_env  # noqa: F401 - registers the ids
from drrl_env.kvcache import KVCACHE_ENV_ID
from oracle.kvcache import (
    KV_CEILINGS,
    KV_POLICIES,
    PlannedPolicy,
    ProfilePolicy,
    decision_flops,
    generation_flops,
    hindsight_profile,
    kv_policy,
    play,
    self_profile,
)

TINY_KV = dict(context=48, prompts=2, observe_tokens=8, horizon=8, ranks=(4, 8, 12, 16), recent_tokens=4)


@pytest.fixture
def env(tiny_layered_model_dir):
    return gym.make(KVCACHE_ENV_ID, model=tiny_layered_model_dir, cache_budget=0.6, **TINY_KV).unwrapped


def test_uniform_is_the_largest_equal_rank_within_budget(env):
    observation, _ = env.reset(seed=0)
    shares = env.byte_shares()
    assert np.all(np.diff(shares) > 0) and shares[-1] == pytest.approx(1.0)
    info = play(env, kv_policy("uniform"), observation)
    assert len(set(info["ranks"])) == 1 and info["budget_used"] <= 0.6 + 1e-12
    larger = [r for r in env.config.ranks if r > info["ranks"][0]]
    assert not larger or shares[env.config.ranks.index(larger[0])] > 0.6  # the next rank up would not fit


def test_the_water_fill_spends_the_budget_where_the_profile_says(env):
    observation, _ = env.reset(seed=0)
    profile = np.zeros((env.num_layers, len(env.config.ranks)))
    profile[1, :-1] = [8.0, 4.0, 2.0]  # layer 1 is sensitive, layer 0 costs nothing
    plan = env.waterfill_plan(profile)
    assert plan[1] > plan[0]
    info = play(env, PlannedPolicy("planned", lambda env: plan), observation)
    assert info["ranks"] == [env.config.ranks[i] for i in plan] and info["budget_used"] <= 0.6 + 1e-12


def test_teacher_and_ceiling_profiles_and_their_episodes(env):
    env.reset(seed=1, options={"prompt": 0})
    for measure in (self_profile, hindsight_profile):
        cost = measure(env)
        assert cost.shape == (env.num_layers, len(env.config.ranks))
        assert np.isfinite(cost).all() and (cost >= 0).all() and (cost[:, -1] == 0).all()  # rank d: no cost
    results = {}
    for name in KV_POLICIES:
        policy = kv_policy(name)
        for budget in (0.6, 0.8):  # a profile is measured once per prompt, spent at each budget
            observation, _ = env.reset(options={"prompt": 0, "budget": budget})
            results[name, budget] = play(env, policy, observation)["kl"]
            assert decision_flops(env, name) >= 0 or name in KV_CEILINGS
        if isinstance(policy, ProfilePolicy):
            assert len(policy.profiles) == 1
    assert all(np.isfinite(kl) and kl >= 0 for kl in results.values())
    assert decision_flops(env, "self_profile") > generation_flops(env) > decision_flops(env, "logit_error") > 0
    assert decision_flops(env, "attention_kl") > 0
    with pytest.raises(ValueError, match="KV-cache policy must be one of"):
        kv_policy("greedy")
    with pytest.raises(ValueError, match="reset option budget must be a share"):
        env.reset(options={"budget": 1.5})
