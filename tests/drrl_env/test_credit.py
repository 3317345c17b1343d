"""Per-step credit of the kl reward (``kl_credit="completion"``, Eq. C): zero on the plan, exact off it, same sum."""

import gymnasium as gym
import numpy as np
import pytest

import drrl_env  # noqa: F401 - registers DRRL-Attention-v0
from drrl_env.config import EnvConfig
from drrl_env.profiles.waterfill import waterfill_plan
from tests.conftest import layer_mdp

RANKS = (2, 4, 8, 12, 16)


@pytest.fixture
def kwargs(tiny_layered_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DRRL_CACHE_DIR", str(tmp_path))
    values = layer_mdp(
        model=tiny_layered_model_dir, ranks=RANKS, seq_len=32, batch_size=2, device="cpu", guardrail="off"
    )
    values.update(spectral_mode="joint", per_head=True, flops_budget=0.5, sensitivity_samples=2, reward="kl")
    values.update(sensitivity_estimate="scaled_delta", kl_baseline="waterfill", kl_shaping_weight=0.0)
    return values


def _action(env, ranks: int | list[int]) -> np.ndarray | int:
    """The action that plays ``ranks`` (a list per key/value group, or one rank for the layer)."""
    indices = np.array([RANKS.index(rank) for rank in np.atleast_1d(ranks)])
    return indices if env.config.per_head else int(indices[0])


def _run(env, seed: int, first_action: np.ndarray | None) -> tuple[list, list, dict]:
    """An episode that takes ``first_action`` at layer 0 (None: the plan's), then the current plan's ranks.

    Checks on the way that a deviation at layer 0 re-plans the rest by the water-fill of the budget it leaves.
    """
    env.reset(options={"episode_seed": seed})
    actions, rewards, terminated = [], [], False
    while not terminated:
        episode = env._episode
        plan = episode.credit.plan if episode.credit else episode.baseline_ranks
        action = first_action if first_action is not None and not actions else _action(env, plan[episode.call.layer])
        _, reward, terminated, _, info = env.step(action)
        if first_action is not None and len(actions) == 0 and episode.credit:
            left = episode.budget.left_share(1)
            rest = waterfill_plan(env.sensitivity_profile[1:], RANKS, env.head_dim, left)
            assert episode.credit.plan == [np.asarray(RANKS)[first_action].tolist(), *rest]
        actions.append(action)
        rewards.append(reward)
    return actions, rewards, info


@pytest.mark.expensive
def test_following_the_teachers_plan_earns_nothing_and_costs_one_forward(kwargs):
    env = gym.make("DRRL-Attention-v0", **{**kwargs, "kl_credit": "completion"}).unwrapped
    _, rewards, info = _run(env, 3, None)
    assert rewards[:-1] == [0.0] * (len(rewards) - 1)
    assert rewards[-1] == pytest.approx(0.0, abs=1e-6 * info["kl"]) and info["kl"] > 1e-5
    assert info["credit_forwards"] == 1 and info["kl_waterfill"] == pytest.approx(info["kl"], rel=1e-5)


@pytest.mark.expensive
@pytest.mark.parametrize("per_head", [True, False])
def test_a_deviation_is_credited_where_it_is_made_and_the_credits_sum_to_the_terminal_reward(kwargs, per_head):
    kwargs["per_head"] = per_head
    env = gym.make("DRRL-Attention-v0", **{**kwargs, "kl_credit": "completion"}).unwrapped
    env.reset(options={"episode_seed": 3})
    teacher_first = env._episode.baseline_ranks[0]
    smallest = _action(env, [RANKS[0]] * env.kv_heads)
    assert teacher_first != ([RANKS[0]] * env.kv_heads if per_head else RANKS[0])  # the deviation below is one
    actions, rewards, info = _run(env, 3, smallest)
    # layer 0 at the smallest ranks, the rest re-planned once (checked in _run), then followed
    assert info["credit_forwards"] == 2  # the teacher's plan, and the one re-planned at layer 0
    assert rewards[0] == pytest.approx(info["kl_waterfill"] - info["kl"], rel=1e-4)  # all of it at layer 0
    assert rewards[0] < 0 and rewards[1:-1] == [0.0] * (len(rewards) - 2)
    assert sum(rewards) == pytest.approx(info["kl_waterfill"] - info["kl"], rel=1e-9)
    assert env._episode.budget.used_share <= 0.5 + 1e-12
    # the same actions with the whole return at the last step: the same sum
    terminal_env = gym.make("DRRL-Attention-v0", **kwargs).unwrapped
    terminal_env.reset(options={"episode_seed": 3})
    total = 0.0
    for action in actions:
        _, reward, terminated, _, terminal_info = terminal_env.step(action)
        total += reward
    assert terminated and terminal_info["kl"] == pytest.approx(info["kl"], rel=1e-6)
    assert total == pytest.approx(sum(rewards), abs=1e-7)


def test_completion_credit_needs_the_waterfill_baseline_and_one_segment_per_layer():
    with pytest.raises(ValueError, match="kl_credit must be one of"):
        EnvConfig(kl_credit="dense")
    with pytest.raises(ValueError, match="kl_credit=.model. completes .* needs kl_baseline=.waterfill."):
        EnvConfig(kl_credit="model", kl_baseline="none")
    with pytest.raises(ValueError, match="needs kl_baseline=.waterfill."):
        EnvConfig(kl_credit="completion", kl_baseline="uniform")
    with pytest.raises(ValueError, match="needs one segment per layer"):
        EnvConfig(kl_credit="completion", kl_baseline="waterfill", sensitivity_samples=2, seq_len=64, segment_len=32)


@pytest.mark.expensive
@pytest.mark.parametrize("per_head", [True, False])
def test_the_model_credit_scores_deviations_without_a_forward_and_sums_to_the_terminal_reward(kwargs, per_head):
    kwargs.update(per_head=per_head, kl_baseline="waterfill_log_ratio")
    env = gym.make("DRRL-Attention-v0", **{**kwargs, "kl_credit": "model"}).unwrapped
    env.reset(options={"episode_seed": 3})
    profile, teacher = env.sensitivity_profile, env._episode.baseline_ranks
    smallest = _action(env, [RANKS[0]] * env.kv_heads)
    actions, rewards, info = _run(env, 3, smallest)
    plan = env._episode.credit.plan
    # Eq. A by hand, in float64: the sum of the profile at each chosen rank
    index = np.vectorize(RANKS.index)
    model = [float(np.take_along_axis(profile, index(np.asarray(p))[..., None], -1).sum()) for p in (teacher, plan)]
    assert info["credit_forwards"] == 0
    assert rewards[0] == pytest.approx(np.log(model[0] / model[1]), rel=1e-9) and rewards[0] < 0
    assert rewards[1:-1] == [0.0] * (len(rewards) - 2)
    assert sum(rewards) == pytest.approx(np.log(info["kl_waterfill"] / info["kl"]), abs=1e-9)
    terminal_env = gym.make("DRRL-Attention-v0", **kwargs).unwrapped
    terminal_env.reset(options={"episode_seed": 3})
    total = sum(terminal_env.step(action)[1] for action in actions)
    assert total == pytest.approx(sum(rewards), abs=1e-7)
    # on the teacher's plan: nothing before the last step, and a return of 0
    _, rewards, info = _run(env, 3, None)
    assert rewards[:-1] == [0.0] * (len(rewards) - 1) and rewards[-1] == pytest.approx(0.0, abs=1e-6)
    assert info["credit_forwards"] == 0
