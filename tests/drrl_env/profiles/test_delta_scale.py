"""The scaled output-delta estimate (Eq. S): its fit, its cache, and the env, oracle and baseline that use it."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from scipy.stats import spearmanr

import drrl_env  # noqa: F401 - registers DRRL-Attention-v0
from agents.evaluate import evaluate_policy
from drrl_env.attention.flops import candidate_attention_flops, low_rank_attention_flops
from drrl_env.config import EnvConfig
from drrl_env.lm.corpora import corpus_tokens, sequential_chunks
from drrl_env.lm.models import load_causal_lm
from drrl_env.profiles import delta_scale as delta_scale_module
from drrl_env.profiles.delta_scale import delta_scale, fit_delta_scale, scaled_delta_profile
from drrl_env.profiles.kl import unit_kl_profile
from drrl_env.profiles.sensitivity import delta_energy_profile, fisher_kl_profile
from oracle.baselines import make_baseline
from oracle.hindsight import HindsightOracle
from tests.conftest import layer_mdp

RANKS = (2, 4, 8, 12, 16)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DRRL_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_scale_is_the_validation_fisher_over_the_validation_delta_energy(tiny_layered_model_dir):
    loaded = load_causal_lm(tiny_layered_model_dir)
    chunks = sequential_chunks(corpus_tokens("wiki", "validation", loaded.tokenizer), 32, 6 * 32)  # batches 4 + 2
    scale = fit_delta_scale(loaded, chunks, RANKS, "joint", None, samples=2, per_head=True)
    fisher = [fisher_kl_profile(loaded, c, RANKS, "joint", None, 2, per_head=True) for c in chunks.split(4)]
    energy = [delta_energy_profile(loaded, c, RANKS, "joint", per_head=True) for c in chunks.split(4)]
    mean_fisher, mean_energy = (4 * fisher[0] + 2 * fisher[1]) / 6, (4 * energy[0] + 2 * energy[1]) / 6
    assert scale.shape == (2, 2, len(RANKS)) and (scale[..., -1] == 0).all()  # rank 16 = head_dim: no change
    np.testing.assert_allclose(scale[..., :-1], mean_fisher[..., :-1] / mean_energy[..., :-1], rtol=1e-10)
    assert (scale[..., :-1] > 0).all()


def test_scale_is_cached_per_configuration(tiny_layered_model_dir, cache, monkeypatch):
    loaded = load_causal_lm(tiny_layered_model_dir)
    first = delta_scale(loaded, RANKS, "joint", None, 32, 2, False, tokens=128)
    assert first.shape == (2, len(RANKS)) and len(list((cache / "delta_scale").iterdir())) == 1

    def refit(*args, **kwargs):
        raise AssertionError("the cached scale was fitted again")

    monkeypatch.setattr(delta_scale_module, "fit_delta_scale", refit)
    np.testing.assert_array_equal(delta_scale(loaded, RANKS, "joint", None, 32, 2, False, tokens=128), first)
    with pytest.raises(AssertionError, match="fitted again"):
        delta_scale(loaded, RANKS, "joint", None, 32, 3, False, tokens=128)  # other samples: another scale


@pytest.mark.expensive
def test_scaled_profile_ranks_a_new_inputs_cells_like_its_exact_profile(tiny_layered_model_dir, cache):
    loaded = load_causal_lm(tiny_layered_model_dir)
    batch = sequential_chunks(corpus_tokens("wiki", "test", loaded.tokenizer), 32, 64)
    profile = scaled_delta_profile(loaded, batch, RANKS, "joint", None, samples=4, per_head=True)
    scale = delta_scale(loaded, RANKS, "joint", None, 32, 4, True)
    np.testing.assert_allclose(profile, scale * delta_energy_profile(loaded, batch, RANKS, "joint", per_head=True))
    exact = unit_kl_profile(loaded, batch, RANKS, "joint", None, per_head=True)
    below = (slice(None), slice(None), slice(0, -1))
    assert spearmanr(profile[below].ravel(), exact[below].ravel()).statistic > 0.9


@pytest.mark.expensive
def test_env_hindsight_and_baseline_with_the_scaled_delta_estimate(tiny_layered_model_dir, cache):
    kwargs = layer_mdp(
        model=tiny_layered_model_dir, ranks=RANKS, seq_len=32, batch_size=2, device="cpu", guardrail="off"
    )
    kwargs.update(spectral_mode="joint", per_head=True, flops_budget=0.5, sensitivity_samples=2)
    env = gym.make("DRRL-Attention-v0", **{**kwargs, "sensitivity_estimate": "scaled_delta"}).unwrapped
    fisher_env = gym.make("DRRL-Attention-v0", **kwargs).unwrapped
    observation, info = env.reset(seed=3)
    _, fisher_info = fisher_env.reset(seed=3)
    expected = scaled_delta_profile(env.loaded, env.input_ids, RANKS, "joint", None, 2, per_head=True)
    np.testing.assert_array_equal(env.sensitivity_profile, expected)
    weights = sum(parameter.numel() for parameter in env.loaded.model.parameters())
    candidates = [low_rank_attention_flops(2, 4, 2, 32, 32, 16, r, "joint") for r in RANKS[:-1]]
    per_layer = candidates[0].spectra + sum(flops.core + flops.projections for flops in candidates)
    assert all(flops.spectra == candidates[0].spectra for flops in candidates)  # one set of spectra per layer
    assert candidate_attention_flops(2, 2, 4, 2, 32, 16, RANKS, "joint") == 2 * per_layer
    assert info["flops_sensitivity"] == 2.0 * weights * 64 + 2 * per_layer
    assert info["flops_sensitivity"] < fisher_info["flops_sensitivity"] / 4  # one forward against 1 + 2 x 2 passes
    policy = make_baseline("hindsight:scaled_delta:2")
    assert isinstance(policy, HindsightOracle) and policy.name == "hindsight:scaled_delta:2"
    policy.act(observation, env.action_masks(), env)
    assert policy.last_profile is env.sensitivity_profile  # the env's estimate, reused
    assert policy.profile_flops == info["flops_sensitivity"] == env.profile_flops("scaled_delta", 2)
    other = HindsightOracle("fisher", samples=2)
    other.act(observation, env.action_masks(), env)
    assert other.last_profile is not env.sensitivity_profile  # another estimate: profiled anew
    assert other.profile_flops == fisher_info["flops_sensitivity"]
    with pytest.raises(ValueError, match="estimate must be 'fisher' or 'scaled_delta'"):
        env.profile_flops("exact", 2)
    check_env(env)
    row = evaluate_policy(HindsightOracle("scaled_delta", 2), kwargs, 1, timing_repeats=0)
    assert row.flops_policy_ratio > 0 and row.flops_with_policy_ratio > row.flops_ratio  # its profile is counted


@pytest.mark.expensive
def test_kl_baseline_waterfill_scores_the_episode_against_its_teachers_allocation(tiny_layered_model_dir, cache):
    kwargs = layer_mdp(
        model=tiny_layered_model_dir, ranks=RANKS, seq_len=32, batch_size=2, device="cpu", guardrail="off"
    )
    kwargs.update(spectral_mode="joint", per_head=True, flops_budget=0.5, sensitivity_samples=2, reward="kl")
    env = gym.make(
        "DRRL-Attention-v0", **{**kwargs, "sensitivity_estimate": "scaled_delta", "kl_baseline": "waterfill_log_ratio"}
    ).unwrapped
    teacher = HindsightOracle("scaled_delta", 2)
    for policy in (teacher, None):  # the teacher's own allocation scores log 1 = 0; the smallest ranks do worse
        observation, _ = env.reset(seed=4)
        teacher.reset(4)
        ranks = np.asarray(RANKS)[np.asarray(teacher.allocate(env))]
        assert env._episode.baseline_ranks == ranks.tolist()  # (L, Hkv) ranks of the water-fill of this batch
        terminated = False
        while not terminated:
            mask = env.action_masks()
            action = teacher.act(observation, mask, env) if policy else np.zeros(env.kv_heads, dtype=np.int64)
            observation, _, terminated, _, info = env.step(action)
        assert info["reward_terms"]["terminal"] == pytest.approx(np.log(info["kl_waterfill"] / info["kl"]), abs=1e-9)
        if policy:
            assert info["kl_waterfill"] == pytest.approx(info["kl"], rel=1e-5) and info["kl"] > 1e-5
        else:
            assert info["reward_terms"]["terminal"] < -0.1
    with pytest.raises(ValueError, match="needs sensitivity_samples > 0 and a flops_budget"):
        EnvConfig(kl_baseline="waterfill", flops_budget=0.5, sensitivity_samples=0)
    trained_with = {**kwargs, "sensitivity_estimate": "scaled_delta", "kl_baseline": "waterfill"}
    row = evaluate_policy(make_baseline("uniform"), trained_with, 1, timing_repeats=0)  # a baseline sees no profile
    assert row.kl > 0


def test_estimate_and_spec_errors_are_clear():
    with pytest.raises(ValueError, match="sensitivity_estimate must be one of"):
        EnvConfig(sensitivity_estimate="delta")
    with pytest.raises(ValueError, match="only the estimates take a sample count"):
        make_baseline("hindsight:exact:4")


@pytest.mark.expensive
def test_the_scaled_delta_teacher_builds_its_own_dataset(tiny_layered_model_dir, cache):
    from agents.warm_start import hindsight_teacher_dataset, teacher_estimate
    from oracle.dataset import load_trajectories, read_metadata

    assert [teacher_estimate(name) for name in ("hindsight", "hindsight:scaled_delta")] == ["fisher", "scaled_delta"]
    with pytest.raises(ValueError, match="to have a teacher"):
        teacher_estimate("none")
    kwargs = layer_mdp(
        model=tiny_layered_model_dir, ranks=RANKS, seq_len=32, batch_size=1, device="cpu", guardrail="off"
    )
    kwargs.update(per_head=True, flops_budget=0.5, sensitivity_samples=2, sensitivity_estimate="scaled_delta")
    folder = hindsight_teacher_dataset(kwargs, 2, "scaled_delta", progress=False)
    assert read_metadata(folder)["policy"] == "hindsight:scaled_delta:2"
    assert folder != hindsight_teacher_dataset(kwargs, 2, "fisher", progress=False)  # one cache folder per teacher
    assert len(load_trajectories(folder)) == 2 * 2  # two episodes of two layers
