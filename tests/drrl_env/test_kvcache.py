"""DRRL-KVCache-v0 on a tiny model: the budget mask, the reward against a direct KL, the prompt cache, determinism."""

import gymnasium as gym
import numpy as np
import pytest

import drrl_env  # noqa: F401 - registers the ids
from drrl_env.generation.decode import teacher_forced_logits
from drrl_env.generation.kv_cache import layer_bytes
from drrl_env.kvcache import KVCACHE_ENV_ID, episode_logits, shared_prompt_states
from drrl_env.lm.scoring import next_token_kl

TINY_KV = dict(context=48, prompts=3, observe_tokens=8, horizon=8, ranks=(4, 8, 12, 16), recent_tokens=4,
               cached_prompts=2, cache_budget=0.6)  # fmt: skip


@pytest.fixture
def make(tiny_layered_model_dir):
    def make(**overrides):
        return gym.make(KVCACHE_ENV_ID, model=tiny_layered_model_dir, **{**TINY_KV, **overrides}).unwrapped

    return make


def play(env, policy, seed=None, prompt=None):
    observation, info = env.reset(seed=seed, options=None if prompt is None else {"prompt": prompt})
    trace, terminated = [observation], False
    while not terminated:
        observation, reward, terminated, _, info = env.step(policy(env))
        trace.append(observation)
    return trace, reward, info


def test_checkers_pass(make):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = make()
    check_env(env, skip_render_check=True)
    sb3_check_env(env)


def test_reward_is_minus_the_kl_of_a_direct_generation_with_the_same_ranks(make):
    env = make()
    rng = np.random.default_rng(0)
    _, reward, info = play(env, lambda env: int(rng.choice(np.flatnonzero(env.action_masks()))), seed=1)
    state, cfg = env._state, env.config  # noqa: SLF001 - the episode's prompt state
    # an independent path: one prefill of the prefix at the episode's ranks, then the continuation
    direct = teacher_forced_logits(env.loaded, state.prefix, state.continuation, info["ranks"], cfg.basis,
                                   sink_tokens=cfg.sink_tokens, recent_tokens=cfg.recent_tokens)  # fmt: skip
    full = teacher_forced_logits(env.loaded, state.prefix, state.continuation, "full", cfg.basis,
                                 sink_tokens=cfg.sink_tokens, recent_tokens=cfg.recent_tokens)  # fmt: skip
    assert -reward == pytest.approx(next_token_kl(full, direct), rel=1e-4, abs=1e-7)
    assert reward < 0 and min(info["ranks"]) < 16  # something was compressed, and it cost something
    full_plan = episode_logits(env.loaded, cfg, state, [16] * env.num_layers)
    assert next_token_kl(state.reference, full_plan) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("budget", [0.45, (0.5, 0.9)])
def test_every_episode_ends_within_its_key_cache_budget(make, budget):
    env = make(cache_budget=budget)
    rng = np.random.default_rng(1)
    shares = []
    for episode in range(4):
        # greedy for the largest rank: the mask alone keeps it within budget
        _, _, info = play(env, lambda env: len(env.config.ranks) - 1 if rng.random() < 0.7 else 0, seed=episode)
        state = env._state  # noqa: SLF001
        # the bytes of the cache the episode really scored through, measured from its tensors
        cache_layers = [state.caches[rank].layers[layer] for layer, rank in enumerate(info["ranks"])]
        used = sum(layer_bytes(layer)["keys"] for layer in cache_layers)
        assert used == pytest.approx(info["budget_used"] * state.full_layer_bytes.sum())
        assert info["budget_used"] <= info["budget"] + 1e-12
        shares.append(info["budget"])
    assert len(set(shares)) == (1 if np.isscalar(budget) else 4)
    with pytest.raises(ValueError, match="cache_budget 0.05 is below the smallest candidates' share"):
        make(cache_budget=0.05).reset(seed=0)


def test_episodes_after_the_first_reuse_the_prompt_and_the_same_seed_gives_the_same_episode(make):
    env, other = make(), make()
    last = lambda env: int(np.flatnonzero(env.action_masks())[-1])  # noqa: E731
    first, reward, _ = play(env, last, seed=3)
    assert env.prefills == 1
    again, reward_again, _ = play(env, last, prompt=env._index)  # noqa: SLF001 - the same prompt again
    assert env.prefills == 1 and reward_again == reward  # no prefill, the same episode
    for observation, expected in zip(again, first, strict=True):
        np.testing.assert_array_equal(observation, expected)
    replayed, reward_other, _ = play(other, last, seed=3)  # another env, the same seed
    assert reward_other == reward
    for observation, expected in zip(replayed, first, strict=True):
        np.testing.assert_array_equal(observation, expected)
    for prompt in range(3):  # three prompts through a memory of two: the least recently used is evicted
        env.reset(options={"prompt": prompt})
    assert list(env._states) == [1, 2]  # noqa: SLF001
    kept = env.prefills
    env.reset(options={"prompt": 1})
    assert env.prefills == kept  # kept: no prefill
    env.reset(options={"prompt": 0})
    assert env.prefills == kept + 1  # evicted: computed again


def test_envs_share_equal_prompts_states_only_inside_a_shared_block(make):
    with shared_prompt_states():
        first, second = make(), make()
        first.reset(options={"prompt": 1})
        second.reset(options={"prompt": 1})
        assert (first.prefills, second.prefills) == (1, 0) and second.current_prompt is first.current_prompt
        second.reset(options={"prompt": 0})
        assert second.prefills == 1  # a prompt no env computed yet
        other = make(horizon=4)  # other state settings: its own state
        other.reset(options={"prompt": 1})
        assert other.prefills == 1 and other.current_prompt is not first.current_prompt
    outside = make()
    outside.reset(options={"prompt": 1})
    assert outside.prefills == 1  # the store ended with the block


def test_bad_arguments_name_the_argument(make):
    for bad, message in [({"context": 0}, "context must be an integer >= 1"), ({"horizon": 1}, "horizon must be"),
                         ({"ranks": ()}, "ranks must be a non-empty"), ({"basis": "calibrated"}, "basis must be"),
                         ({"cache_budget": 1.5}, "cache_budget must be None"), ({"ranks": (4, 32)}, "head_dim"),
                         ({"prompts": 10**8}, "holds only")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            make(**bad)
    with pytest.raises(TypeError, match="unknown argument"):
        make(seq_len=8)
    env = make()
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(0)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"action must be an integer in \[0, 4\)"):
        env.step(7)
    with pytest.raises(ValueError, match="reset option prompt must be an index"):
        env.reset(options={"prompt": 3})


def test_maskable_ppo_trains_in_it(make):
    from sb3_contrib import MaskablePPO

    env = make(cached_prompts=3)
    model = MaskablePPO("MlpPolicy", env, n_steps=8, batch_size=8, n_epochs=1, seed=0)
    model.learn(16)  # 8 episodes of 2 layers on a pool of 3 prompts, all kept: each computed once
    assert model.num_timesteps >= 16 and env.prefills <= 3


def test_an_episode_record_replays(make):
    import json

    from drrl_env.replay import replay

    env = make(cache_budget=(0.5, 0.9))
    rng = np.random.default_rng(2)
    play(env, lambda env: int(rng.choice(np.flatnonzero(env.action_masks()))), seed=4)
    record = json.loads(json.dumps(env.episode_record()))  # JSON-ready
    assert record["env_id"] == KVCACHE_ENV_ID and len(record["steps"]) == env.num_layers and record["terminated"]
    result = replay(record)
    assert result.matches, result.message
    record["kl"] += 1e-3
    assert not replay(record).matches


@pytest.mark.parametrize("baseline", ["uniform_log_ratio", "static"])  # both rules, both forms
def test_the_paired_reward_is_the_improvement_on_the_fixed_rules_kl_on_the_same_prompt(make, baseline):
    import math

    plain, paired = make(), make(kl_baseline=baseline)
    plain.reset(seed=3)
    rule = plain.uniform_plan() if baseline.startswith("uniform") else plain.waterfill_plan(plain.static_profile())
    *_, rule_info = play(plain, lambda env: rule[env.layer], seed=3)  # the fixed rule played as an episode
    agent = [0, 3]  # another allocation, refused down to what the budget allows
    *_, info = play(plain, lambda env: agent[env.layer], seed=3)
    _, reward, paired_info = play(paired, lambda env: agent[env.layer], seed=3)
    assert paired_info["kl"] == info["kl"] and paired_info["kl_baseline"] == rule_info["kl"]
    difference = rule_info["kl"] - info["kl"]
    ratio = math.log(max(rule_info["kl"], 1e-9) / max(info["kl"], 1e-9))
    assert reward == pytest.approx(ratio if baseline.endswith("log_ratio") else difference, rel=1e-12, abs=1e-15)
    assert info["kl"] != rule_info["kl"]  # the test compares two allocations, not one with itself


def test_the_attention_kl_option_shows_the_observed_tokens_attention_kl_and_charges_it(make):
    from gymnasium.utils.env_checker import check_env

    from drrl_env.generation.decode_profile import observed_attention_kls

    env = make(attention_kl=True, static_prior=True)
    check_env(env, skip_render_check=True)
    K = len(env.config.ranks)
    assert env.observation_space.shape == (4 * K + 6,)
    observation, info = env.reset(seed=0)
    cfg, state = env.config, env.current_prompt
    expected = observed_attention_kls(env.loaded, state.prefix, cfg.ranks, cfg.observe_tokens, cfg.basis,
                                      sink_tokens=cfg.sink_tokens, recent_tokens=cfg.recent_tokens)  # fmt: skip
    for layer in range(env.num_layers):
        np.testing.assert_allclose(observation[-K:], np.log10(expected[layer] + 1e-7), rtol=1e-6)
        observation, *_ = env.step(int(np.flatnonzero(env.action_masks())[0]))
    plain = make(static_prior=True)
    plain_observation, plain_info = plain.reset(seed=0)
    np.testing.assert_array_equal(env.reset(seed=0)[0][: 3 * K + 6], plain_observation)  # the rest unchanged
    assert info["flops_observation"] == pytest.approx(plain_info["flops_observation"] + env.attention_kl_flops())
    with pytest.raises(ValueError, match="attention_kl must be True or False"):
        make(attention_kl="yes")


def test_the_static_prior_shows_the_validation_profile_and_the_static_allocation(make):
    from gymnasium.utils.env_checker import check_env

    env = make(static_prior=True)
    check_env(env, skip_render_check=True)
    K = len(env.config.ranks)
    assert env.observation_space.shape == (3 * K + 6,)
    observation, _ = env.reset(seed=0)
    profile, plan = env.static_profile(), env.waterfill_plan(env.static_profile())
    for layer in range(env.num_layers):
        np.testing.assert_allclose(observation[2 * K + 5 : 3 * K + 5], np.log10(profile[layer] + 1e-7), rtol=1e-6)
        assert observation[-1] == pytest.approx(env.config.ranks[plan[layer]] / env.head_dim)
        observation, *_ = env.step(plan[layer])
    plain, _ = make().reset(seed=0)
    np.testing.assert_array_equal(make(static_prior=True).reset(seed=0)[0][: 2 * K + 5], plain)  # the rest unchanged
