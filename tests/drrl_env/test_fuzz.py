"""Keep bad input from coming back: properties of EnvConfig and step inputs (hypothesis), and 10^4 fuzzed steps."""

import dataclasses
import math

import gymnasium as gym
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import drrl_env  # noqa: F401 - registers DRRL-Attention-v0
from drrl_env.config import ENV_ID, PAPER_ENV_ID, PER_LAYER_ENV_ID, VARIANTS, EnvConfig

FIELDS = [field.name for field in dataclasses.fields(EnvConfig)]
ANYTHING = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.one_of(st.integers(-5, 80), st.floats(-5, 80)), max_size=4),
    st.tuples(st.floats(allow_nan=True), st.floats(allow_nan=True)),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.builds(object),
)
TINY = dict(seq_len=16, batch_size=1, device="cpu", sensitivity_samples=2)
"""small, and the Eq. S signal (the default) at 2 label samples: every drawn candidate set fits its own scale"""


@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from(FIELDS), value=ANYTHING)
def test_every_config_value_is_accepted_or_refused_by_name(name, value):
    try:
        config = EnvConfig(**{name: value})
    except (ValueError, TypeError) as error:
        assert name in str(error), (name, value, str(error))
        assert "\n" not in str(error)
        return
    accepted = getattr(config, name)  # what was kept is what the env will use, in its documented type
    if name in ("alpha", "beta", "gamma", "eps0", "eps_decay", "violation_penalty", "terminal_lm_weight"):
        assert math.isfinite(accepted) and accepted >= 0
    if name == "ranks":
        assert all(isinstance(r, int) and r >= 1 for r in accepted) and list(accepted) == sorted(set(accepted))
    if name in ("per_head",):
        assert isinstance(accepted, (bool, np.bool_))


def _valid_kwargs():
    ranks = st.lists(st.integers(1, 16), min_size=1, max_size=5, unique=True).map(sorted)
    return st.fixed_dictionaries(
        {
            "ranks": ranks,
            "segment_len": st.one_of(st.none(), st.integers(1, 16)),
            "per_head": st.booleans(),
            "spectral_mode": st.sampled_from(["separate", "joint"]),
            "reward": st.sampled_from(["auto", "kl", "eq13"]),
            "guardrail": st.sampled_from(["exact", "eq9", "off"]),
            "eps0": st.floats(1e-3, 2.0),
            "beta": st.floats(0.0, 10.0),
            "kl_shaping_weight": st.floats(0.0, 10.0),
            "budget": st.one_of(st.none(), st.floats(0.0, 1.0), st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0))),
        }
    )


@pytest.mark.expensive
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=_valid_kwargs(), seed=st.integers(0, 2**31 - 1))
def test_every_valid_config_builds_an_env_that_rolls_out(tiny_model_dir, drawn, seed):
    drawn = dict(drawn)
    budget, smallest = drawn.pop("budget"), min(drawn["ranks"]) / 16  # the tiny model's head dim is 16
    if budget is not None:  # a budget between the smallest rank's share and 1 (below it is a documented error)
        budget = tuple(smallest + b * (1 - smallest) for b in sorted(np.atleast_1d(budget)))
    # no signal here (each drawn candidate set would fit its own Eq. S scale); the step fuzz below has it
    env = gym.make("DRRL-Attention-v0", model=tiny_model_dir, flops_budget=budget, **{**TINY, "sensitivity_samples": 0},
                   **drawn)  # fmt: skip
    observation, _ = env.reset(seed=seed)
    terminated = False
    while not terminated:
        assert env.observation_space.contains(observation)
        action = env.action_space.sample()
        observation, reward, terminated, _, info = env.step(action)
        assert math.isfinite(reward)
    if budget is not None:
        assert info["budget_used"] <= info["budget"] + 1e-9


@pytest.mark.expensive
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(action=ANYTHING)
def test_every_action_is_taken_or_refused_by_name(tiny_model_dir, action):
    env = _shared_env(tiny_model_dir)
    before = env.unwrapped.episode_record()["steps"]
    try:
        env.step(action)
    except (ValueError, TypeError) as error:
        assert "action" in str(error) and "\n" not in str(error)
        assert env.unwrapped.episode_record()["steps"] == before  # a refused action changes nothing
    if env.unwrapped.episode_record()["terminated"]:
        env.reset(seed=0)


_ENVS: dict[str, gym.Env] = {}


def _shared_env(model_dir: str) -> gym.Env:
    if model_dir not in _ENVS:
        _ENVS[model_dir] = gym.make("DRRL-Attention-v0", model=model_dir, ranks=(4, 8, 16), **TINY)
        _ENVS[model_dir].reset(seed=0)
    return _ENVS[model_dir]


FUZZ_CONFIGS = [  # (registered id, overrides); four steps per segment unless said: episodes of 8 steps
    (PER_LAYER_ENV_ID, {"segment_len": None}),
    (PER_LAYER_ENV_ID, {"spectral_mode": "separate", "guardrail": "exact"}),
    (ENV_ID, {}),
    (ENV_ID, {"segment_len": 8, "flops_budget": (0.3, 0.9)}),
    (PAPER_ENV_ID, {"eps0": 1e-6, "seq_len": 16}),
    (PAPER_ENV_ID, {"spectral_mode": "joint", "terminal_lm_weight": 1.0, "seq_len": 16}),
    (PER_LAYER_ENV_ID, {"flops_budget": (0.3, 1.0), "guardrail": "off"}),
    (PER_LAYER_ENV_ID, {"flops_budget": 0.3, "reward": "eq13", "guardrail": "eq9", "eps0": 1e-3}),
    (ENV_ID, {"guardrail": "exact", "eps0": 1e-3, "segment_len": 8}),
    (PER_LAYER_ENV_ID, {"flops_budget": None, "reward": "kl", "kl_shaping_weight": 5.0}),
]
"""every registered id, and the settings that stress the masks, rewards and guardrails"""
FUZZ_STEPS = 2_400  # 240 steps (about 30 episodes) per configuration


def _masked_sample(env: gym.Env, mask: np.ndarray, rng: np.random.Generator):
    space = env.action_space
    if isinstance(space, gym.spaces.Discrete):
        return int(rng.choice(np.flatnonzero(mask)))
    groups = mask.reshape(len(space.nvec), -1)
    return np.array([rng.choice(np.flatnonzero(group)) for group in groups])


@pytest.mark.expensive
def test_thousands_of_fuzzed_steps_in_every_configuration(tiny_model_dir):
    rng = np.random.default_rng(0)
    violations = steps = 0
    assert {env_id for env_id, _ in FUZZ_CONFIGS} == set(VARIANTS)
    for env_id, overrides in FUZZ_CONFIGS:
        kwargs = {"segment_len": 4, **TINY, **overrides}
        env = gym.make(env_id, model=tiny_model_dir, ranks=(2, 4, 8, 12, 16), **kwargs)
        observation, _ = env.reset(seed=int(rng.integers(2**31)))
        for _ in range(FUZZ_STEPS // len(FUZZ_CONFIGS)):
            mask = env.unwrapped.action_masks()
            groups = mask.reshape(-1, 5)
            assert groups.any(axis=1).all(), overrides  # never all-False
            assert env.observation_space.contains(observation), overrides
            choice = rng.random()
            if choice < 0.5:
                action = _masked_sample(env, mask, rng)
            elif choice < 0.8:
                action = env.action_space.sample()
            else:  # the extremes
                action = np.zeros_like(env.action_space.sample()) + (0 if rng.random() < 0.5 else 4)
            observation, reward, terminated, _, info = env.step(action)
            assert np.isfinite(reward), overrides
            violations += info["masked_violation"]
            steps += 1
            if terminated:
                if info["budget"] is not None:
                    assert info["budget_used"] <= info["budget"] + 1e-9, overrides
                if "kl" in info:
                    assert np.isfinite(info["kl"]) and info["kl"] >= 0
                observation, _ = env.reset()
        env.close()
    assert steps >= FUZZ_STEPS - len(FUZZ_CONFIGS) and violations > 0


@pytest.mark.parametrize("value", ["False", "no", 0.5, 2, None])
def test_boolean_like_strings_never_switch_a_feature_on(value, tiny_model_dir):
    for name in ("per_head",):
        with pytest.raises(ValueError, match=name):
            EnvConfig(**{name: value})
