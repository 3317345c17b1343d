"""The 'reference' kl baselines and ``RankOffsets``: a residual policy's action space around a fixed allocation."""

import json

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import drrl_env  # noqa: F401 - registers DRRL-Attention-v0
from agents.agent_file import read_description
from drrl_env.wrappers import RankOffsets
from tests.conftest import layer_mdp

REFERENCE = (12, 8)  # the tiny layered model has 2 layers; ranks (4, 8, 12, 16)


def layered(model_dir, **overrides):
    kwargs = layer_mdp(model=model_dir, ranks=(4, 8, 12, 16), seq_len=32, batch_size=2, guardrail="off")
    return gym.make("DRRL-Attention-v0", **{**kwargs, **overrides}).unwrapped


def play(env, choose, seed=5):
    observation, _ = env.reset(seed=seed)
    terminated, played = False, []
    while not terminated:
        action = choose(env, observation)
        observation, reward, terminated, _, info = env.step(action)
        played.append(info["rank"])
    return info, played, reward


@pytest.mark.expensive
def test_reference_baseline_scores_the_episode_against_the_reference_on_the_same_batch(tiny_layered_model_dir):
    env = layered(tiny_layered_model_dir, kl_baseline="reference", reference_ranks=REFERENCE)
    info, _, _ = play(env, lambda e, o: e.config.ranks.index(REFERENCE[e.attention_call.layer]))
    assert info["kl"] > 1e-4 and info["kl_reference"] == pytest.approx(info["kl"], rel=1e-5)
    assert info["reward_terms"]["terminal"] == pytest.approx(0.0, abs=1e-6 * info["kl"])
    info, _, _ = play(env, lambda e, o: 0)  # rank 4 everywhere: worse than the reference
    assert info["kl"] > info["kl_reference"]
    assert info["reward_terms"]["terminal"] == pytest.approx(info["kl_reference"] - info["kl"])
    ratio = layered(tiny_layered_model_dir, kl_baseline="reference_log_ratio", reference_ranks=REFERENCE)
    info, _, _ = play(ratio, lambda e, o: 0)
    assert info["reward_terms"]["terminal"] == pytest.approx(np.log(info["kl_reference"] / info["kl"]), abs=1e-9)


def test_reference_ranks_are_checked(tiny_layered_model_dir):
    with pytest.raises(ValueError, match="needs reference_ranks"):
        layered(tiny_layered_model_dir, kl_baseline="reference")
    with pytest.raises(ValueError, match=r"reference_ranks must be candidate ranks .*\[5\]"):
        layered(tiny_layered_model_dir, reference_ranks=(5, 8))
    with pytest.raises(ValueError, match=r"one rank per layer \(2\), got 3"):
        layered(tiny_layered_model_dir, reference_ranks=(8, 8, 8))
    with pytest.raises(ValueError, match="RankOffsets needs reference_ranks"):
        RankOffsets(layered(tiny_layered_model_dir))
    with pytest.raises(ValueError, match="including 0"):
        RankOffsets(layered(tiny_layered_model_dir, reference_ranks=REFERENCE), (-1, 1))


def test_rank_offsets_replays_the_reference_at_offset_zero_and_moves_by_candidate_steps(tiny_layered_model_dir):
    env = RankOffsets(layered(tiny_layered_model_dir, reference_ranks=REFERENCE, flops_budget=None))
    assert env.action_space == gym.spaces.Discrete(5)
    check_env(env, skip_render_check=True)
    zero = env.offsets.index(0)
    _, played, _ = play(env, lambda e, o: zero)
    assert played == list(REFERENCE)
    _, played, _ = play(env, lambda e, o: env.offsets.index(1))
    assert played == [16, 12]  # one candidate step up
    _, _ = env.reset(seed=5)
    assert env.action_masks().tolist() == [True, True, True, True, False]  # 12 + 2 steps does not exist


def test_rank_offsets_obey_the_budget_and_report_the_surplus(tiny_layered_model_dir):
    base = layered(tiny_layered_model_dir, reference_ranks=(8, 8), flops_budget=0.5)  # the reference spends it all
    env = RankOffsets(base, (-1, 0, 1))
    observation, _ = env.reset(seed=5)
    assert observation.shape == (base.observation_space.shape[0] + 2,)
    assert observation[-2] == pytest.approx(0.5) and observation[-1] == pytest.approx(0.0, abs=1e-6)
    observation, *_ = env.step(2)  # rank 12 at layer 0: over the reference's pace
    assert observation[-1] < 0  # less left than the reference would have
    mask = env.action_masks()
    assert mask.tolist() == [True, False, False]  # the budget leaves only rank 4 for the last layer
    _, _, _, _, info = env.step(0)
    assert info["rank"] == 4 and not info["masked_violation"] and info["budget_used"] <= 0.5 + 1e-9
    env.reset(seed=5)
    env.step(2)
    _, _, _, _, info = env.step(2)  # a masked offset is played as the nearest allowed rank, never a violation
    assert info["rank"] == 4 and not info["masked_violation"]


def test_rank_offsets_translate_for_an_env_without_reference_ranks(tiny_layered_model_dir):
    base = layered(tiny_layered_model_dir, flops_budget=None)
    translator = RankOffsets(base, (-1, 0, 1), reference_ranks=REFERENCE)
    observation, _ = base.reset(seed=5)
    terminated, played = False, []
    while not terminated:
        assert translator.observation(observation)[-2] == pytest.approx(REFERENCE[base.attention_call.layer] / 16)
        observation, _, terminated, _, info = base.step(translator.action(2))  # offset +1
        played.append(info["rank"])
    assert played == [16, 12]
    with pytest.raises(ValueError, match=r"reference_ranks must be 2 candidate ranks"):
        RankOffsets(base, reference_ranks=(8,))


def test_a_residual_agent_starts_at_its_reference_and_its_file_says_so(tiny_layered_model_dir, tmp_path):
    from agents.agent_file import read_description, save_agent
    from agents.algorithms import get_algorithm
    from agents.evaluate import evaluate_policy
    from agents.networks import policy_setup
    from agents.residual import start_at_reference
    from agents.training import make_vec_env
    from agents.zoo import make_policy

    kwargs = layer_mdp(model=tiny_layered_model_dir, ranks=(4, 8, 12, 16), seq_len=32, batch_size=1, guardrail="off",
                  reference_ranks=REFERENCE, kl_baseline="reference_log_ratio", device="cpu")  # fmt: skip
    setup = policy_setup("mlp", offsets=(-1, 0, 1), reference_ranks=REFERENCE)
    model = get_algorithm("maskable_ppo").make(make_vec_env(kwargs, setup, 1, 0), setup, 0, None, n_steps=8)
    start_at_reference(model, setup)
    path = save_agent(model, tmp_path / "residual", setup)
    description = read_description(path)
    assert description.offsets == [-1, 0, 1] and description.reference_ranks == list(REFERENCE)
    agent = make_policy(
        str(path), {k: v for k, v in kwargs.items() if k != "reference_ranks"} | {"kl_baseline": "none"}
    )
    row = evaluate_policy(agent, {**kwargs, "reference_ranks": None, "kl_baseline": "none"}, 2, timing_repeats=0)
    assert row.rank_per_layer == pytest.approx(list(REFERENCE))  # offset 0 everywhere: the reference itself
    assert row.episode_rank_per_layer == [list(REFERENCE)] * 2 and len(row.episode_kl) == 2
    with pytest.raises(ValueError, match="both offsets and reference_ranks"):
        policy_setup("mlp", offsets=(-1, 0, 1))


def test_train_agent_residual_runs_resumes_and_refuses_a_budget_range(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from agents.residual import residual_setup
    from tests.test_train_agent import tiny_options
    from train_agent import main, parse_options

    class StaticStub:  # the static allocation's profile is tested elsewhere (test_hindsight); here, its wiring
        def allocation(self, budget):
            assert budget == 0.625
            return [2, 1]  # candidate indices: ranks 12 and 8

    monkeypatch.setattr("agents.residual.make_policy", lambda spec, kwargs: StaticStub())
    monkeypatch.setenv("DRRL_CACHE_DIR", str(tmp_path / "cache"))
    common = [
        *tiny_options(tiny_model_dir),
        "--preset",
        "residual",
        "--logdir",
        str(tmp_path / "runs"),
        "--n-steps",
        "32",
    ]
    code = main([*common, "--total-timesteps", "32", "--compare", "uniform", "--eval-episodes", "1",
                 "--timing-repeats", "0"])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    assert "residual agent: static allocation" in out.out and "maskable_ppo (this run)" in out.out
    (run_dir,) = (tmp_path / "runs").glob("DRRL-Attention-PerLayer-v0__maskable_ppo__0__*")
    stored = json.loads((run_dir / "config.json").read_text())
    assert stored["kl_baseline"] == "reference_log_ratio" and stored["reference_ranks"] == [12, 8]
    assert read_description(run_dir / "model.safetensors").reference_ranks == stored["reference_ranks"]
    assert main(["--resume", str(run_dir), "--total-timesteps", "64", "--compare"]) == 0
    out = capsys.readouterr()
    assert "64 steps" in out.out and "residual agent: static allocation" not in out.out  # the stored allocation
    for refused in (["--flops-budget", "0.5", "0.75"], ["--flops-budget", "none"], ["--per-head"]):
        with pytest.raises(ValueError, match="--residual needs one --flops-budget share"):
            run = parse_options([*common, *refused])
            residual_setup(run.train, run.env)


@pytest.mark.parametrize(
    "reference, offsets",
    [("88", (-1, 0, 1)), ([8.7, 8], (-1, 0, 1)), ([12, 8], (-1, 0, 0.5)), ([12, 8], (0, 2**70)), ([12, 8], (1, 2))],
)  # fmt: skip
def test_rank_offsets_refuses_what_it_would_otherwise_round(tiny_env_kwargs, reference, offsets):
    env = gym.make("DRRL-Attention-v0", **{**tiny_env_kwargs, "seq_len": 16})
    with pytest.raises(ValueError, match="reference_ranks must be|offsets must be"):
        RankOffsets(env, offsets, reference)
