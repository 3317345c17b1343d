"""Comparing policies in TensorBoard: one run per policy, budgets apart in the tags, short names, a layout."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import layer_mdp


@pytest.mark.expensive
def test_a_two_budget_two_policy_evaluation_reads_back_as_a_user_expects(tiny_layered_model_dir, tmp_path):
    from agents import evaluate

    corpus = tmp_path / "my_corpus.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i}: " + "some words of text " * 30 for i in range(60)))
    kwargs = layer_mdp(model=tiny_layered_model_dir)
    argv = ["--model", kwargs["model"], "--ranks", "4", "8", "12", "16", "--seq-len", "32", "--episodes", "1",
            "--env", "DRRL-Attention-PerLayer-v0", "--corpora", str(corpus), "--budgets", "0.625", "0.5",
            "--policies", "uniform", "fixed:8", "--timing-repeats", "0", "--fig4-lengths",
            "--out", str(tmp_path / "results"), "--logdir", str(tmp_path / "tb")]  # fmt: skip
    assert evaluate.main(argv) == 0
    (board,) = (tmp_path / "tb").iterdir()
    runs = sorted(path.name for path in board.iterdir())
    assert runs == ["figures", "fixed:8", "layout", "uniform"]  # one run per policy
    tags = EventAccumulator(str(board / "uniform")).Reload().Tags()["scalars"]
    assert "eval/kl/my_corpus/joint/budget_0.625" in tags and "eval/kl/my_corpus/joint/budget_0.5" in tags
    assert not any("//" in tag or str(tmp_path) in tag for tag in tags)  # short corpus names, no paths
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.util import tensor_util

    (config,) = EventAccumulator(str(board / "layout")).Reload().Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(config.tensor_proto).item())
    charts = {category.title: [chart.multiline.tag[0] for chart in category.chart] for category in layout.category}
    assert charts["KL to the full model (nats/token)"] == ["^eval/kl/my_corpus/joint/by_budget$"]  # all policies
    steps = [event.step for event in EventAccumulator(str(board / "uniform")).Reload().Scalars(
        "eval/kl/my_corpus/joint/by_budget")]  # fmt: skip
    assert sorted(steps) == [500, 625]  # the budget as the step: a line across budgets
    images = EventAccumulator(str(board / "figures")).Reload().Tags()["images"]
    assert "pareto" in images and (tmp_path / "results" / "pareto.png").is_file()


def test_tags_name_the_budget_and_the_corpus_by_its_stem():
    from agents.results import EvaluationRow
    from agents.tensorboard import corpus_name, eval_tag, run_name

    row = EvaluationRow("maskable_ppo:run/a", "/home/user/data/my_corpus.txt", "joint", 1, 1, 3.0, 3.0, 1, 1, 1,
                        0.01, 32, 0, 1, 1, [32], [[32]])  # fmt: skip
    assert corpus_name(row.corpus) == "my_corpus" and corpus_name("wiki") == "wiki"
    assert eval_tag("kl", row, 0.5) == "eval/kl/my_corpus/joint/budget_0.5"
    assert eval_tag("kl", row, (0.5, 0.75)) == "eval/kl/my_corpus/joint/budget_0.5-0.75"
    assert run_name(row.policy) == "maskable_ppo:run_a"
