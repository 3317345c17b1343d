import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.seeding import np_random
from transformers import AutoModelForCausalLM, AutoTokenizer

import drrl_env  # noqa: F401  (registers the env)
from agents.algorithms import ALGORITHMS, ModelPolicy, get_algorithm
from agents.evaluate import evaluate_policy
from agents.networks import policy_setup
from drrl_env.lm.corpora import corpus_tokens, sample_batch
from drrl_env.profiles.waterfill import allocate_ranks
from oracle.baselines import BASELINES, FullRank, make_baseline
from tests.conftest import PAPER_MDP, ROOT, layer_mdp


@pytest.fixture
def zoo_env_kwargs(tiny_layered_model_dir):
    return layer_mdp(model=tiny_layered_model_dir, ranks=(2, 4, 8, 12, 16), seq_len=32, segment_len=8, batch_size=2)


@pytest.mark.expensive
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_registered_algorithm_trains_and_acts(name, zoo_env_kwargs):
    algorithm = get_algorithm(name)
    env = gym.make("DRRL-Attention-v0", **zoo_env_kwargs)
    extra = {"n_steps": 32} if algorithm.on_policy else {"learning_starts": 64, "train_freq": 8}
    if name in ("ppo", "maskable_ppo", "trpo", "recurrent_ppo"):
        extra["batch_size"] = 32
    model = algorithm.make(env, policy_setup("mlp"), seed=0, logdir=None, **extra)
    model.learn(256)
    assert model.num_timesteps >= 256
    row = evaluate_policy(
        ModelPolicy(model.policy, algorithm, policy_setup("mlp"), name), zoo_env_kwargs, 1, timing_repeats=0
    )
    assert 0.0 <= row.violation_rate <= 1.0
    assert row.flops_policy_ratio > 0.0 and row.flops_with_policy_ratio > row.flops_ratio
    if algorithm.masked:
        assert row.violation_rate == 0.0


def test_unknown_algorithm_lists_the_registry():
    with pytest.raises(ValueError, match="maskable_ppo"):
        get_algorithm("sac")


@pytest.mark.expensive
@pytest.mark.parametrize(
    "spec",
    [
        "full",
        "uniform",
        "fixed:8",
        "energy:0.9",
        "random",
        "stable_rank",
        "threshold:0.1",
        "gumbel:0.05",
        "static:0.6",
        "static",
        "oracle",
        "hindsight",
    ],
)
@pytest.mark.parametrize("budgeted", [False, True])
def test_heuristic_policies_only_pick_allowed_ranks(spec, budgeted, zoo_env_kwargs):
    assert spec.partition(":")[0] in BASELINES
    kwargs = {**zoo_env_kwargs, **PAPER_MDP, "eps0": 0.3, "eps_decay": 0.0}
    if budgeted:  # the budget and the exact guardrail (eq13: the oracle scores it)
        kwargs.update(flops_budget=0.5, guardrail="exact")
    policy = make_baseline(spec, kwargs)
    env = gym.make("DRRL-Attention-v0", **kwargs).unwrapped
    if spec == "hindsight" and not budgeted:
        env.reset(seed=0)
        with pytest.raises(ValueError, match="flops_budget"):
            policy.act(env.unwrapped._observation(), env.action_masks(), env)
        return
    masked_steps, chosen = 0, set()
    for episode in range(3):
        obs, _ = env.reset(seed=episode)
        policy.reset(episode)
        terminated = False
        while not terminated:
            mask = env.action_masks()
            masked_steps += not mask.all()
            action = policy.act(obs, mask, env)
            assert mask[action], (spec, action, mask)
            chosen.add(action)
            obs, _, terminated, _, info = env.step(action)
            assert not info["masked_violation"]
    assert masked_steps > 0  # the guardrail was active


@pytest.mark.parametrize(
    "spec", ["full", "uniform", "fixed:8", "energy:0.9", "random", "stable_rank", "threshold:0.1", "gumbel:0.05"]
)
@pytest.mark.parametrize("guardrail", ["exact", "off"])
def test_baselines_pick_one_allowed_rank_per_group_in_a_per_head_env(spec, guardrail, zoo_env_kwargs):
    kwargs = {**zoo_env_kwargs, "per_head": True, "flops_budget": 0.5, "guardrail": guardrail, "eps0": 0.3}
    env = gym.make("DRRL-Attention-v0", **{**kwargs, "eps_decay": 0.0}).unwrapped
    layered = gym.make("DRRL-Attention-v0", **{**kwargs, "per_head": False}, eps_decay=0.0).unwrapped
    policy, reference = make_baseline(spec, kwargs), make_baseline(spec, kwargs)
    num_candidates = len(kwargs["ranks"])
    for episode in range(2):
        obs, _ = env.reset(seed=episode)
        layered_obs, _ = layered.reset(seed=episode)
        policy.reset(episode)
        reference.reset(episode)
        terminated, played = False, set()
        while not terminated:
            mask = env.action_masks().reshape(env.kv_heads, num_candidates)
            action = policy.act(obs, env.action_masks(), env)
            assert action.shape == (env.kv_heads,) and all(mask[group, k] for group, k in enumerate(action)), spec
            if guardrail == "off" and spec in ("uniform", "fixed:8"):
                # one target within the budget and no per-group guardrail: every group plays what one rank per
                # layer would (a target above it meets per-group budget masks that assume the others smallest)
                layered_action = reference.act(layered_obs, layered.action_masks(), layered)
                assert set(action.tolist()) == {layered_action}, spec
                layered_obs, *_ = layered.step(layered_action)
            obs, _, terminated, _, info = env.step(action)
            played.update(info["rank"])
        assert info["budget_used"] <= 0.5 + 1e-9


def test_baseline_specs_are_checked():
    with pytest.raises(ValueError, match="unknown baseline 'fixd:3'"):
        make_baseline("fixd:3")
    with pytest.raises(ValueError, match="bad parameter in policy spec 'energy:x'"):
        make_baseline("energy:x")


def test_static_allocation_spreads_cuts_where_they_are_cheapest():
    flops = np.array([0.55, 0.7, 0.85, 1.0])
    # layer 0 is insensitive, layer 1 very sensitive; both convex in rank
    cost = np.array([[0.30, 0.05, 0.01, 0.0], [8.0, 2.0, 0.5, 0.0], [1.0, 0.2, 0.05, 0.0]])
    chosen = allocate_ranks(cost, flops, budget=0.8)
    assert np.mean(flops[chosen]) <= 0.8
    naive = [0, 3, 2]  # the least sensitive layer straight to the minimum, the rest to fit the same budget
    assert np.mean(flops[naive]) <= 0.8
    assert cost[range(3), chosen].sum() < cost[range(3), naive].sum()
    assert chosen[1] == 3  # the sensitive layer keeps full rank
    assert allocate_ranks(cost, flops, budget=0.1) == [0, 0, 0]  # unreachable budget: all at the minimum


def episode_rng(seed):
    """The generator an episode reset with ``seed`` draws its batch from (its episode seed, from ``np_random``)."""
    return np.random.default_rng(int(np_random(seed)[0].integers(2**63)))


def test_full_rank_row_equals_the_models_own_perplexity(zoo_env_kwargs):
    """The largest candidate is the head width: low-rank attention at r = d is full attention."""
    kwargs = {**zoo_env_kwargs, "ranks": (4, 16), "flops_budget": None}
    row = evaluate_policy(FullRank(), kwargs, episodes=2, seed=7, timing_repeats=0)
    model = AutoModelForCausalLM.from_pretrained(kwargs["model"]).eval()  # plain SDPA, no drrl hook
    tokens = corpus_tokens("wiki", "test", AutoTokenizer.from_pretrained(kwargs["model"]))
    losses = [
        float(model(input_ids=(batch := sample_batch(tokens, 2, 32, episode_rng(seed))), labels=batch).loss)
        for seed in (7, 8)
    ]
    assert row.ppl == pytest.approx(np.exp(np.mean(losses)), rel=1e-4)
    assert row.ppl_full == pytest.approx(np.exp(np.mean(losses)), rel=1e-5)
    assert row.flops_core_ratio == pytest.approx(1.0)


@pytest.mark.expensive
def test_evaluate_command(tiny_layered_model_dir, tmp_path):
    help_text = subprocess.run(
        [sys.executable, "-m", "agents.evaluate", "--help"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    for flag in ("--policies", "--corpora", "--modes", "--ablations", "--out", "--fig4-lengths"):
        assert flag in help_text
    out = subprocess.run(
        [sys.executable, "-m", "agents.evaluate", "--model", tiny_layered_model_dir, "--ranks", "4", "8", "16",
         "--seq-len", "32", "--episodes", "1", "--policies", "full", "fixed:8", "energy:0.9",
         "--env", "DRRL-Attention-PerLayer-v0", "--modes", "separate", "joint", "--guardrail", "exact",
         "--corpora", "wiki", "shakespeare", "--ablations", "--fig4-lengths", "64", "--timing-repeats", "1",
         "--out", str(tmp_path / "results"), "--logdir", str(tmp_path / "tb")],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    results = tmp_path / "results"
    table = (results / "table.md").read_text()
    assert table.count("\n") == 2 + 3 * 2 * 2 * 2  # header + policies x corpora x modes x (guardrail on/off)
    assert "energy:0.9 (no guardrail)" in table and "| shakespeare | joint |" in table
    for png in ("pareto", "fig4_sequence_length", "fig5_perturbation", "fig3_ranks_energy_0.9_separate"):
        assert (results / f"{png}.png").stat().st_size > 1000
    assert (results / "results.csv").read_text().startswith("policy,corpus,mode")
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))


@pytest.mark.expensive
def test_static_allocation_matches_a_saved_models_flops(zoo_env_kwargs, tmp_path):
    from sb3_contrib import MaskablePPO

    from agents.agent_file import save_agent
    from agents.evaluate import parse_plan, run_evaluation
    from agents.results import adaptivity_verdicts

    env = gym.make("DRRL-Attention-v0", **zoo_env_kwargs)
    path = save_agent(MaskablePPO("MlpPolicy", env, seed=0), tmp_path / "agent")
    common = ["--model", zoo_env_kwargs["model"], "--ranks", "2", "4", "8", "12", "16", "--seq-len", "32",
              "--episodes", "1", "--corpora", "wiki", "--modes", "separate", "--timing-repeats", "0",
              "--env", "DRRL-Attention-Paper-v0", "--batch-size", "2"]  # fmt: skip
    rows = run_evaluation(*parse_plan([*common, "--policies", str(path), "static:match", "--ablations"]))
    agent, static, agent_unmasked, static_unmasked = rows
    assert static_unmasked.matched_to == agent_unmasked.policy and agent_unmasked.policy.endswith("(no guardrail)")
    assert static.policy.startswith("static:") and float(static.policy.split(":")[1]) == pytest.approx(
        agent.flops_logits_ratio, abs=1e-4
    )
    assert static.flops_logits_ratio <= agent.flops_logits_ratio + 1e-3
    assert static.matched_to == agent.policy
    verdict, verdict_unmasked = adaptivity_verdicts(rows)
    assert verdict_unmasked.startswith("wiki/separate without guardrail: ")
    assert verdict.startswith("wiki/separate: ")
    if "no equal-FLOPs comparison" in verdict:
        assert abs(static.flops_logits_ratio - agent.flops_logits_ratio) > 0.01 * agent.flops_logits_ratio
    else:
        assert ("the agent beats" in verdict) == (agent.ppl < static.ppl and agent.kl < static.kl)
    with pytest.raises(ValueError, match="static:match needs a saved agent"):
        run_evaluation(*parse_plan([*common, "--policies", "static:match"]))


def test_per_head_model_is_evaluated(zoo_env_kwargs):
    from sb3_contrib import MaskablePPO

    kwargs = {**zoo_env_kwargs, "per_head": True, "flops_budget": None}  # per-group masks cannot express a joint budget
    model = MaskablePPO("MlpPolicy", gym.make("DRRL-Attention-v0", **kwargs), n_steps=32, batch_size=32, seed=0)
    model.learn(64)
    policy = ModelPolicy(model.policy, get_algorithm("maskable_ppo"), policy_setup("mlp"), "per-head")
    row = evaluate_policy(policy, kwargs, episodes=1, timing_repeats=1)
    assert min(kwargs["ranks"]) <= row.mean_rank <= max(kwargs["ranks"]) and row.violation_rate == 0.0
    assert np.isfinite(row.ppl) and row.ms_per_token > 0


def test_adaptivity_verdicts_say_plainly_who_wins():
    from agents.results import EvaluationRow, adaptivity_verdicts

    def row(policy, nll, flops, matched_to=None, kl=0.1):
        return EvaluationRow(policy, "wiki", "joint", 1, 1, nll, 3.0, flops, flops, flops, kl, 32, 0, 1, 1,
                             [32], [[32]], matched_to=matched_to)  # fmt: skip

    agent = row("agent", 3.2, 1.5)
    assert "the agent beats the" in adaptivity_verdicts([agent, row("static:1.5", 3.3, 1.5, "agent", kl=0.2)])[0]
    assert "does NOT beat" in adaptivity_verdicts([agent, row("static:1.5", 3.1, 1.505, "agent", kl=0.05)])[0]
    mixed = adaptivity_verdicts([agent, row("static:1.5", 3.3, 1.5, "agent", kl=0.05)])[0]
    assert "does NOT clearly beat (lower PPL, higher KL)" in mixed and "agent KL 0.1000, PPL 24.53" in mixed
    assert "no equal-FLOPs comparison" in adaptivity_verdicts([agent, row("static:1.5", 3.1, 1.8, "agent")])[0]


def test_evaluation_runs_on_the_split_it_is_given(zoo_env_kwargs):
    from agents.evaluate import parse_plan, run_evaluation

    common = ["--model", zoo_env_kwargs["model"], "--ranks", "2", "4", "8", "12", "16", "--seq-len", "32",
              "--episodes", "1", "--corpora", "wiki", "--modes", "joint", "--timing-repeats", "0",
              "--policies", "full"]  # fmt: skip
    assert parse_plan(common)[1]["split"] == "test"  # reports on the test split unless told otherwise
    (test,) = run_evaluation(*parse_plan(common))
    (validation,) = run_evaluation(*parse_plan([*common, "--split", "validation"]))
    assert test.nll_full != validation.nll_full  # other text, same seed


def test_results_csv_reads_back_what_was_written(tmp_path):
    from agents.results import EvaluationRow, read_csv, write_csv

    rows = [
        EvaluationRow("fixed:32", "news", "separate", 2, 510, 3.25, 3.0, 1.7, 0.8, 0.5, 0.0421, 32.0, 0.0, 1.5, 1.2,
                      [32.0, 40.0], [], budget=0.5, episode_kl=[0.04, 0.0442], headroom_captured=0.25, decision_ms=2.5),
        EvaluationRow("static:0.5", "news", "separate", 2, 510, 3.5, 3.0, 1.6, 0.75, 0.5, 0.05, 30.0, 0.1, 1.4, 1.2,
                      [24.0, 36.0], [], flops_policy_ratio=1e-6, matched_to="fixed:32", headroom_captured=0.0,
                      decision_ms=0.1),
    ]  # fmt: skip
    write_csv(rows, tmp_path / "results.csv")
    assert read_csv(tmp_path / "results.csv") == rows


def test_uniform_spends_the_budget_evenly(tiny_env_kwargs):
    from oracle.baselines import make_baseline

    for budget, expected in ((0.75, {12}), (0.5, {8})):
        env = gym.make("DRRL-Attention-v0", **{**tiny_env_kwargs, "flops_budget": budget, "guardrail": "off"}).unwrapped
        policy = make_baseline("uniform")
        obs, _ = env.reset(seed=0)
        terminated, ranks = False, set()
        while not terminated:
            obs, _, terminated, _, info = env.step(policy.act(obs, env.action_masks(), env))
            ranks.add(info["rank"])
        assert ranks == expected and info["budget_used"] == pytest.approx(budget)


def test_headroom_captured_and_delta_ppl():
    from agents.results import EvaluationRow, fill_headroom_captured, markdown_table

    def row(policy, kl, budget=0.625, corpus="wiki", nll=3.2):
        return EvaluationRow(policy, corpus, "joint", 1, 1, nll, 3.0, 1, 1, budget or 1, kl, 40, 0, 1, 1, [40], [[40]],
                             budget=budget)  # fmt: skip

    rows = [row("uniform", 0.02), row("static:fisher", 0.015), row("hindsight:fisher", 0.01), row("agent", 0.0125)]
    rows += [row("uniform", 0.04, 0.5), row("agent", 0.03, 0.5)]  # no hindsight at this budget: no headroom
    rows += [row("uniform", 0.01, corpus="news"), row("hindsight", 0.02, corpus="news")]  # hindsight not better
    fill_headroom_captured(rows)
    assert [r.headroom_captured for r in rows[:4]] == pytest.approx([-1.0, 0.0, 1.0, 0.5])
    assert all(np.isnan(r.headroom_captured) for r in rows[4:])
    assert rows[0].delta_ppl_percent == pytest.approx(100 * (np.exp(0.2) - 1))
    table = markdown_table(rows)
    assert "| budget |" in table and "| headroom captured |" in table and "| ΔPPL % |" in table
    assert "| agent | wiki | joint | 0.625 | 24.53 | 20.09 | +22.14 | 0.0125 | 0.50 |" in table
    assert "| agent | wiki | joint | 0.5 | 24.53 | 20.09 | +22.14 | 0.0300 | - |" in table
    for rows_without in ([row("uniform", 0.02, budget=None)],):
        assert "budget" not in markdown_table(rows_without) and "headroom" not in markdown_table(rows_without)


@pytest.mark.expensive
def test_evaluate_at_several_budgets(tiny_layered_model_dir, tmp_path):
    from agents.evaluate import main

    code = main(["--model", tiny_layered_model_dir, "--ranks", "4", "8", "16", "--seq-len", "32", "--episodes", "1",
                 "--policies", "uniform", "fixed:4", "--corpora", "wiki", "--modes", "joint", "--guardrail", "off",
                 "--budgets", "0.75", "0.5", "--fig4-lengths", "--timing-repeats", "0",
                 "--out", str(tmp_path / "results"), "--logdir", str(tmp_path / "tb")])  # fmt: skip
    assert code == 0
    lines = (tmp_path / "results/table.md").read_text().splitlines()
    assert lines[0].startswith("| policy | corpus | mode | budget | PPL |") and len(lines) == 2 + 2 * 2
    uniform = {line.split(" | ")[3]: float(line.split(" | ")[8]) for line in lines[2:] if line.startswith("| uniform")}
    assert uniform == pytest.approx({"0.75": 0.75, "0.5": 0.5}, abs=0.01)  # FLOPs (logits) at each budget
    for png in ("budget_ppl", "budget_kl", "fig3_ranks_uniform_joint_budget0.75", "fig3_ranks_uniform_joint_budget0.5"):
        assert (tmp_path / "results" / f"{png}.png").stat().st_size > 1000


def test_contrasting_inputs_figure_picks_the_two_most_different_inputs():
    from agents.figures import contrasting_inputs_figures
    from agents.results import EvaluationRow

    def row(policy, ranks, episode_ranks=(), kls=()):
        return EvaluationRow(policy, "wiki", "joint", len(episode_ranks), 1, 3.0, 3.0, 1, 1, 0.6, 0.01, 40, 0, 1, 1,
                             ranks, [[r] for r in ranks], episode_rank_per_layer=[list(e) for e in episode_ranks],
                             episode_kl=list(kls), budget=0.625)  # fmt: skip

    agent = row("maskable_ppo:bc", [40, 40], [(40, 40), (24, 56), (48, 32)], (0.01, 0.02, 0.03))
    rows = [row("static:fisher", [48, 32]), agent, row("uniform", [40, 40], [(40, 40), (40, 40)], (0.1, 0.2))]
    ((name, figure),) = contrasting_inputs_figures(rows, "wiki")  # baselines get none, the saved agent one
    assert name == "fig3_inputs_maskable_ppo_bc_joint_budget0.625"
    labels = [line.get_label() for line in figure.axes[0].get_lines()]
    assert labels[0].startswith("maskable_ppo:bc, input 1 (KL 0.0200)") and "input 2" in labels[1]
    assert labels[2].startswith("static:fisher")
    assert contrasting_inputs_figures(rows, "news") == []
    rows[1] = row("maskable_ppo:bc", [40, 40], [(40, 40), (40, 40)], (0.01, 0.03))
    ((_, figure),) = contrasting_inputs_figures(rows, "wiki")
    assert [line.get_label() for line in figure.axes[0].get_lines()][0].startswith("maskable_ppo:bc, all 2 inputs")
