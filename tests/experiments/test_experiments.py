"""Every experiment runs end to end on a tiny model (its numbers are not the point here; that it still runs is)."""

import importlib

import pytest

from tests.conftest import LAYER_MDP, ROOT

pytestmark = pytest.mark.expensive

EXPERIMENTS = sorted(path.stem for path in (ROOT / "experiments").glob("[a-z]*.py"))
TINY_RANKS = ["4", "8", "12", "16"]


def tiny_arguments(name, model, tmp_path):
    """Each experiment's command line, shrunk to the tiny model and a handful of cells."""
    batch = ["--model", model, "--ranks", *TINY_RANKS, "--seq-len", "32", "--episodes", "2", "--samples", "2"]
    kv = ["--model", model, "--context", "48", "--observe-tokens", "8", "--horizon", "8", "--ranks", "4", "8", "12",
          "16", "--recent-tokens", "4"]  # fmt: skip
    return {
        "attention_kl_rule": [*kv, "--prompts", "2", "--validation-prompts", "1", "--budgets", "0.6", "--hindsight"],
        "decode_profile_predictor": ["--model", model, "--context", "80", "--train-prompts", "2", "--test-prompts",
                                     "2", "--tokens", "4", "--window", "8", "--ranks", "4", "8", "--mean-rank", "8"],
        "delta_signal": ["--model", model, "--ranks", *TINY_RANKS, "--seq-len", "32", "--episodes", "1",
                         "--budgets", "0.625", "--samples", "2", "--policies", "uniform"],
        "granularity_headroom": ["--model", model, "--chunks", "1", "--validation-chunks", "1", "--seq-len", "32",
                                 "--segment-len", "16", "--ranks", *TINY_RANKS, "--budgets", "0.625"],
        "kvcache_policies": ["--model", model, "--prompts", "2", "--context", "48", "--observe-tokens", "8",
                             "--horizon", "8", "--ranks", "4", "8", "12", "16", "--recent-tokens", "4",
                             "--budgets", "0.75", "0.6", "--out", str(tmp_path / "kv")],
        "key_cache_profile": ["--model", model, "--profile-context", "80", "--profile-tokens", "4", "--ranks", "4",
                              "8", "--mean-rank", "8", "--context", "80", "--prompts", "1", "--tokens", "4"],
        "measure_headroom": ["--model", model, "--chunks", "1", "--validation-chunks", "1", "--seq-len", "32",
                             "--ranks", *TINY_RANKS, "--budgets", "0.625", "--modes", "joint"],
        "measure_reward_guardrail": ["--model", model, "--ranks", *TINY_RANKS, "--episodes", "2", "--seq-len", "32",
                                     "--batch-size", "1", "--eps", "0.2"],
        "move_value_fit": [*batch, "--moves", "4", "--save", str(tmp_path / "moves.npz")],
        "teacher_neighbourhood": [*batch, "--swaps", "4", "--rounds", "1"],
        "teacher_predictability": ["--dataset", str(tmp_path / "teacher")],
        "teacher_tilt": batch,
    }[name]  # fmt: skip


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_on_a_tiny_model(name, tiny_layered_model_dir, tmp_path, capsys):
    module = importlib.import_module(f"experiments.{name}")
    assert module.__doc__ and len(module.__doc__.split()) > 30, "each experiment states its question and answer"
    if name == "teacher_predictability":  # it reads a hindsight teacher's dataset of one fixed budget
        from oracle import record_trajectories
        from oracle.hindsight import HindsightOracle

        kwargs = dict(model=tiny_layered_model_dir, ranks=(4, 8, 12, 16), seq_len=32, batch_size=1,
                      **{**LAYER_MDP, "guardrail": "off"}, flops_budget=0.625)  # fmt: skip
        record_trajectories(tmp_path / "teacher", HindsightOracle("fisher", 2), 2, kwargs, 0, progress=False)
    module.main(tiny_arguments(name, tiny_layered_model_dir, tmp_path))
    assert capsys.readouterr().out.strip(), f"experiments.{name} printed nothing"


def test_every_experiment_is_in_the_index():
    index = (ROOT / "experiments" / "README.md").read_text()
    missing = [name for name in EXPERIMENTS if f"experiments.{name}" not in index]
    assert not missing, f"experiments/README.md lacks {missing}"
