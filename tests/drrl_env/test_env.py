import pickle

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env, data_equivalence

import drrl_env  # noqa: F401 - registers DRRL-Attention-v0
from drrl_env.attention.bounds import logit_perturbation_bound, normalized_energy_ratio, transition_norm
from drrl_env.attention.flops import full_attention_flops, low_rank_attention_flops
from drrl_env.attention.lowrank import attend, expand_kv_heads, full_attention, low_rank_qk
from tests.conftest import PAPER_MDP, TINY_SIZES


def make(tiny_env_kwargs, **overrides):
    return gym.make("DRRL-Attention-v0", **{**tiny_env_kwargs, **overrides})


def rollout(env, seed, steps, policy):
    obs, info = env.reset(seed=seed)
    record = [obs, info["action_mask"]]
    for _ in range(steps):
        obs, reward, terminated, truncated, info = env.step(policy(env))
        record += [obs, reward, info["action_mask"], info["rank"]]
        if terminated:
            obs, info = env.reset()
            record += [obs]
    return record


@pytest.mark.parametrize(
    "overrides",
    [{}, {"per_head": True}, {"segment_len": 12, "spectral_mode": "joint"}, PAPER_MDP, {"flops_budget": (0.3, 0.9)}],
)
def test_check_env_passes(tiny_env_kwargs, overrides):
    # skip_render_check: check_env renders without a render_mode; both modes are tested below.
    env = make(tiny_env_kwargs, **overrides)
    check_env(env.unwrapped, skip_render_check=True)
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    sb3_check_env(env.unwrapped)


@pytest.mark.expensive
@pytest.mark.parametrize("env_id", sorted(drrl_env.VARIANTS))
def test_check_env_passes_on_every_registered_id(tiny_model_dir, env_id):
    signal = {"sensitivity_samples": 2} if env_id == drrl_env.ENV_ID else {}  # the Eq. S scale's fit, smaller
    env = gym.make(env_id, model=tiny_model_dir, **TINY_SIZES, **signal)
    config = env.unwrapped.config
    for name, value in drrl_env.VARIANTS[env_id].items():
        if name not in TINY_SIZES:
            assert getattr(config, name) == (tuple(value) if isinstance(value, list) else value), name
    check_env(env.unwrapped, skip_render_check=True)


def test_the_default_id_is_the_recommended_mdp_and_train_agents_default():
    from drrl_env.config import EnvConfig
    from train_agent import parse_options

    run = parse_options([])
    assert run.env_id == drrl_env.ENV_ID
    assert EnvConfig(**run.env) == EnvConfig() == EnvConfig(**gym.spec(drrl_env.ENV_ID).kwargs)
    assert EnvConfig().per_head and EnvConfig().sensitivity_estimate == "scaled_delta"
    paper = EnvConfig(**gym.spec(drrl_env.PAPER_ENV_ID).kwargs)
    assert (paper.spectral_mode, paper.reward_kind, paper.guardrail, paper.flops_budget) == (
        "separate",
        "eq13",
        "eq9",
        None,
    )


def test_registered_by_module_prefix_and_spaces(tiny_env_kwargs):
    env = gym.make("drrl_env:DRRL-Attention-v0", **tiny_env_kwargs)
    assert env.action_space == gym.spaces.Discrete(4)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    per_head = make(tiny_env_kwargs, per_head=True)
    assert per_head.action_space == gym.spaces.MultiDiscrete([4, 4])
    per_head.reset(seed=0)
    assert per_head.unwrapped.action_masks().shape == (8,)


def test_same_seed_gives_identical_episodes(tiny_env_kwargs):
    a, b = make(tiny_env_kwargs, segment_len=16), make(tiny_env_kwargs, segment_len=16)  # fresh eps_t clocks
    policy = lambda env: int(np.flatnonzero(env.unwrapped.action_masks())[0])  # noqa: E731
    assert data_equivalence(rollout(a, 7, 10, policy), rollout(b, 7, 10, policy))
    different = rollout(make(tiny_env_kwargs, segment_len=16), 8, 2, policy)
    assert not data_equivalence(rollout(a, 7, 2, policy), different)


def test_episode_walks_layers_and_segments_then_terminates(tiny_env_kwargs):
    env = make(tiny_env_kwargs, segment_len=12)
    env.reset(seed=0)
    seen, terminated = [], False
    while not terminated:
        _, _, terminated, truncated, info = env.step(3)
        seen.append((info["layer"], info["segment"]))
        assert not truncated
    assert seen == [(layer, s) for layer in range(2) for s in range(3)]
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(0)


def test_masked_action_runs_nearest_allowed_rank_with_penalty(tiny_env_kwargs):
    env = make(tiny_env_kwargs, **{**PAPER_MDP, "eps0": 1e-9}, violation_penalty=0.25)
    env.reset(seed=0)
    env.step(3)  # previous rank 16 = d: only rank 16 stays within a tiny threshold
    mask = env.unwrapped.action_masks()
    assert mask.tolist() == [False, False, False, True]
    _, _, _, _, info = env.step(0)
    assert info["masked_violation"] and info["rank"] == 16 and info["requested_rank"] == 4
    assert info["reward_terms"]["violation"] == -0.25


def test_guardrail_off_allows_everything(tiny_env_kwargs):
    env = make(tiny_env_kwargs, eps0=1e-9, guardrail="off", flops_budget=None)
    env.reset(seed=0)
    assert env.unwrapped.action_masks().all()


@pytest.mark.parametrize("mode", ["separate", "joint"])
def test_reward_terms_equal_an_independent_recomputation(tiny_env_kwargs, mode):
    alpha, beta, gamma = 1.3, 0.7, 0.4
    env = make(
        tiny_env_kwargs, **{**PAPER_MDP, "guardrail": "off"}, spectral_mode=mode, alpha=alpha, beta=beta, gamma=gamma
    )
    env.reset(seed=3)
    inner = env.unwrapped
    env.step(1)  # rank 8 at layer 0; layer 1 is next
    call = inner.attention_call
    q, k, v = call.query.double(), call.key.double(), call.value.double()
    _, reward, _, _, info = env.step(2)  # rank 12 at layer 1
    assert reward == pytest.approx(sum(info["reward_terms"].values()))
    rank, prev, d = 12, 8, 16
    # fidelity: cosine of full vs low-rank outputs, recomputed in float64 from Q, K, V
    q_low, k_low = low_rank_qk(q, k, rank, mode)
    low = attend(q_low, k_low, v, call.scale)
    full = full_attention(q, k, v, call.scale)
    cosine = torch.nn.functional.cosine_similarity(full, low, dim=-1).mean()
    assert info["reward_terms"]["fidelity"] == pytest.approx(alpha * float(cosine), abs=1e-5)
    # FLOPs
    b, hq, m, _ = q.shape
    ratio = low_rank_attention_flops(b, hq, 2, m, m, d, rank, mode).total / full_attention_flops(b, hq, m, m, d).total
    assert info["reward_terms"]["flops"] == pytest.approx(-beta * ratio)
    # perturbation of the transition 8 -> 12, relative to the logits' Frobenius norm, from an SVD
    logits = q @ expand_kv_heads(k, hq // 2).transpose(-1, -2) * call.scale
    if mode == "joint":
        s = torch.linalg.svdvals(logits / call.scale)
        change = transition_norm(s, prev, rank) * call.scale
    else:
        qs, ks = torch.linalg.svdvals(q), torch.linalg.svdvals(k)
        change = logit_perturbation_bound(qs, ks, prev, rank, call.scale, "fro")
    relative = float(change.square().sum().sqrt() / torch.linalg.matrix_norm(logits).square().sum().sqrt())
    assert info["perturbation"] == pytest.approx(relative, rel=1e-5)
    assert info["reward_terms"]["perturbation"] == pytest.approx(-gamma * relative, rel=1e-5)


def test_observation_contains_ner_and_context(tiny_env_kwargs):
    env = make(tiny_env_kwargs)
    obs, _ = env.reset(seed=0)
    call = env.unwrapped.attention_call
    ranks = torch.tensor([4, 8, 12, 16]).view(-1, 1, 1)
    ner = 0.5 * (
        normalized_energy_ratio(torch.linalg.svdvals(call.query.double()), ranks).mean(dim=(1, 2))
        + normalized_energy_ratio(torch.linalg.svdvals(call.key.double()), ranks).mean(dim=(1, 2))
    )
    assert np.allclose(obs[16 + 9 + 1 : 16 + 9 + 1 + 4], ner.numpy(), atol=1e-5)
    assert obs[-3:].tolist() == [0.0, 0.0, 1.0]  # depth 0, one segment, eps_t = eps0


def test_terminal_lm_reward(tiny_env_kwargs):
    env = make(tiny_env_kwargs, **{**PAPER_MDP, "guardrail": "off"}, terminal_lm_weight=2.0)
    env.reset(seed=0)
    terminated = False
    while not terminated:
        _, _, terminated, _, info = env.step(0)
    expected = 2.0 * (info["lm_loss_full"] - info["lm_loss"])
    assert info["reward_terms"]["terminal"] == pytest.approx(expected)
    assert info["lm_loss"] != info["lm_loss_full"]


def test_bad_kwargs_and_actions_get_clear_errors(tiny_env_kwargs):
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['alhpa'\]"):
        make(tiny_env_kwargs, alhpa=1.0)
    for bad, message in [
        ({"ranks": (4, 4)}, "distinct"),
        ({"ranks": (4, 32)}, "head_dim"),
        ({"spectral_mode": "svd"}, "spectral_mode"),
        ({"seq_len": 1}, "seq_len"),
        ({"segment_len": 64}, "segment_len"),
        ({"beta": float("nan")}, "beta"),
        ({"eps0": 0.0}, "eps0"),
        ({"flops_budget": 0.2}, r"below the smallest candidate's share 4/16"),
        ({"flops_budget": 1.5}, r"flops_budget must lie in \(0, 1\]"),
        ({"flops_budget": (0.8, 0.5)}, "lo <= hi"),
        ({"reward": "ppl"}, "reward must be one of"),
        ({"guardrail": "on"}, "guardrail must be one of"),
        ({"split": "dev"}, "split"),
    ]:
        with pytest.raises(ValueError, match=message):
            make(tiny_env_kwargs, **bad)
    from drrl_env.env import DRRLAttentionEnv

    with pytest.raises(ValueError, match="render_mode"):
        DRRLAttentionEnv(render_mode="bogus", **tiny_env_kwargs)
    env = make(tiny_env_kwargs)
    with pytest.raises(gym.error.ResetNeeded):  # gym.make's OrderEnforcing wrapper
        env.step(0)
    with pytest.raises(RuntimeError, match="call reset"):  # the env itself
        env.unwrapped.step(0)
    env.reset(seed=0)
    for bad, message in [
        (4, r"\[0, 3\]"),
        (-1, r"\[0, 3\]"),
        (np.nan, "NaN"),
        (np.array([1, 2]), "shape"),
        (1.5, "fractional"),
    ]:
        with pytest.raises(ValueError, match=message):
            env.step(bad)


def test_render_modes(tiny_env_kwargs):
    env = make(tiny_env_kwargs, render_mode="ansi", segment_len=16, guardrail="off")
    env.reset(seed=0)
    env.step(1)
    text = env.render()
    assert "8" in text.splitlines()[1] and "-" in text.splitlines()[2]
    image = make(tiny_env_kwargs, render_mode="rgb_array")
    image.reset(seed=0)
    image.step(0)
    frame = image.render()
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[-1] == 3


def test_pickle_keeps_the_guardrail_clock(tiny_env_kwargs):
    env = make(tiny_env_kwargs).unwrapped
    env.reset(seed=0)
    env.set_guardrail_step(2)
    env.step(0)
    clone = pickle.loads(pickle.dumps(env))
    assert clone.guardrail_step == 2 and clone.loaded is env.loaded  # model loaded once per process
    obs, _ = clone.reset(seed=0)
    assert clone.observation_space.contains(obs)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_vector_envs(tiny_env_kwargs, mode):
    envs = gym.make_vec("DRRL-Attention-v0", num_envs=2, vectorization_mode=mode, **tiny_env_kwargs)
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (2, envs.single_observation_space.shape[0])
    for _ in range(5):
        obs, rewards, *_ = envs.step(np.array([1, 3]))
        assert np.isfinite(rewards).all()
    envs.close()


@pytest.mark.expensive
def test_maskable_ppo_learns_without_a_wrapper(tiny_env_kwargs):
    from sb3_contrib import MaskablePPO
    from sb3_contrib.common.maskable.callbacks import MaskableEvalCallback

    env = make(tiny_env_kwargs)
    eval_env = make(tiny_env_kwargs, split="validation")
    model = MaskablePPO("MlpPolicy", env, n_steps=64, batch_size=32, n_epochs=2, seed=0, verbose=0)
    callback = MaskableEvalCallback(eval_env, n_eval_episodes=2, eval_freq=100, verbose=0)
    model.learn(256, callback=callback)
    assert model.num_timesteps >= 256 and callback.last_mean_reward > -np.inf


@pytest.mark.expensive
def test_subproc_vec_env(tiny_env_kwargs):
    from stable_baselines3.common.vec_env import SubprocVecEnv

    envs = SubprocVecEnv([lambda: make(tiny_env_kwargs) for _ in range(2)], start_method="spawn")
    envs.reset()
    _, rewards, _, _ = envs.step(np.array([0, 3]))
    masks = envs.env_method("action_masks")
    assert np.isfinite(rewards).all() and len(masks) == 2
    envs.close()


@pytest.mark.expensive
def test_maskable_ppo_on_the_default_model():
    from sb3_contrib import MaskablePPO

    env = gym.make("DRRL-Attention-v0", sensitivity_samples=2)  # the Eq. S scale of test_check_env_on_the_real_defaults
    model = MaskablePPO("MlpPolicy", env, n_steps=60, batch_size=30, n_epochs=1, seed=0)
    model.learn(120)
    assert model.num_timesteps >= 120


def test_bad_config_values_name_the_argument(tiny_env_kwargs):
    for bad, message in [
        ({"per_head": "no"}, "per_head must be True or False"),
        ({"guardrail": "False"}, "guardrail must be one of"),
        ({"ranks": (4.7, 8)}, r"entry 4.7"),
        ({"ranks": "4"}, "ranks must be a non-empty sequence"),
        ({"ranks": (float("nan"), 4)}, "entry nan"),
        ({"ranks": ()}, "ranks must be a non-empty sequence"),
        ({"beta": 1e308}, r"beta must be a finite number >= 0 and <= 1e\+06"),
        ({"device": "meta"}, "device must be"),
        ({"device": "gpu7"}, "device must be"),
        ({"model": ""}, "model must be a non-empty string"),
    ]:
        with pytest.raises(ValueError, match=message):
            make(tiny_env_kwargs, **bad)
    assert make(tiny_env_kwargs, eps0=np.float32(0.5), ranks=np.array([8, 4])).unwrapped.config.ranks == (4, 8)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            make(tiny_env_kwargs, device="cuda")


def test_bad_actions_name_the_action(tiny_env_kwargs):
    env = make(tiny_env_kwargs).unwrapped
    env.reset(seed=0)
    for bad, message in [
        ({}, "action must be integer"),
        (object(), "action must be integer"),
        (2**63, str(2**63)),
        (2**70, str(2**70)),
        (np.array(["1"], dtype=object), "action must be integer"),
        ("1", "action must be integer"),
    ]:
        with pytest.raises(ValueError, match=message):
            env.step(bad)
    env.step(np.array([1], dtype=object))  # an integral number in an object array is still an index
