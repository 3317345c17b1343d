"""Every command answers bad input with one line that names the option, and writes nothing."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agents import bc, perplexity
from tests.conftest import ROOT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=ENV)


def error_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    return out.stderr.strip().splitlines()[-1]


def in_process(main, argv: list[str], capsys) -> str:
    """The last stderr line of ``main(argv)``, which must exit with status 2 (argparse's or ours)."""
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    assert status == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["--seq-len", "1"], "--seq-len: expected an integer >= 2, got 1"),
        (["--seq-len", "0"], "--seq-len: expected an integer >= 2, got 0"),
        (["--batch-size", "0"], "--batch-size: expected an integer >= 1, got 0"),
        (["--batch-size", "-1"], "--batch-size: expected an integer >= 1, got -1"),
        (["--ranks", "0"], "--ranks: expected an integer >= 1, got 0"),
        (["--split", "dev"], "--split: invalid choice: 'dev'"),
    ],
)
def test_perplexity_arguments(arguments, expected, capsys):
    assert expected in in_process(perplexity.main, arguments, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_perplexity_on_cuda_without_a_gpu(capsys):
    line = in_process(perplexity.main, ["--device", "cuda"], capsys)
    assert line.startswith("error: ") and "cuda" in line


def test_perplexity_rank_above_the_head_dim(tiny_model_dir, capsys):
    line = in_process(perplexity.main, ["--model", tiny_model_dir, "--ranks", "17", "--seq-len", "32"], capsys)
    assert "--ranks must be <= the head dim 16" in line


@pytest.mark.parametrize("arguments", [["--epochs", "0"], ["--batch-size", "0"], ["--history", "0"]])
def test_bc_arguments(arguments, tmp_path, capsys):
    line = in_process(bc.main, ["--dataset", str(tmp_path), "--out", str(tmp_path / "m"), *arguments], capsys)
    assert arguments[0] in line and "expected an integer >= 1" in line


def test_bc_validation_fraction_and_out(tmp_path, capsys):
    line = in_process(bc.main, ["--dataset", str(tmp_path), "--out", "m", "--validation-fraction", "1.5"], capsys)
    assert "validation_fraction must lie in (0, 1), got 1.5" in line
    assert "--out must name an agent file" in in_process(bc.main, ["--dataset", str(tmp_path), "--out", ""], capsys)
    folder = tmp_path / "existing"  # "--out /tmp" once wrote /tmp.safetensors beside the folder
    folder.mkdir()
    assert "not a folder" in in_process(bc.main, ["--dataset", str(tmp_path), "--out", str(folder)], capsys)
    assert not (tmp_path / "existing.safetensors").exists()


def test_oracle_out_must_be_a_usable_folder(tiny_model_dir, tmp_path, capsys):
    from oracle.__main__ import main

    common = ["--episodes", "1", "--model", tiny_model_dir, "--seq-len", "32"]
    assert "--out must name a folder, got ''" in in_process(main, [*common, "--out", ""], capsys)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "is a file, not a folder" in in_process(main, [*common, "--out", str(a_file)], capsys)
    assert "which is a file" in in_process(main, [*common, "--out", str(a_file / "below")], capsys)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert "not empty and holds no trajectory dataset" in in_process(main, [*common, "--out", str(other)], capsys)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]  # nothing mixed in


@pytest.mark.expensive
def test_train_agent_and_evaluate_output_folders(tmp_path, capsys):
    from agents import evaluate

    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "--logdir" in error_line(run("train_agent.py", "--logdir", str(a_file)))  # the command as users run it
    assert "--out" in in_process(evaluate.main, ["--out", str(a_file)], capsys)
    assert "--logdir" in in_process(evaluate.main, ["--out", str(tmp_path / "r"), "--logdir", ""], capsys)
    # a bad spec anywhere in --policies is refused before the first cell is evaluated
    line = in_process(evaluate.main, ["--out", str(tmp_path / "r"), "--policies", "full", "fixd:32"], capsys)
    assert "--policies 'fixd:32': neither an existing agent file nor a baseline" in line


@pytest.mark.parametrize(
    "command, argv",
    [("train_agent", ["--logdir", "{tmp}/runs"]), ("oracle.__main__", ["--episodes", "1", "--out", "{tmp}/o"]),
     ("agents.evaluate", ["--out", "{tmp}/o"]),
     ("agents.record", ["--policy", "uniform", "--episodes", "1", "--out", "{tmp}/o"])],
)  # fmt: skip
def test_a_model_that_is_not_there_is_one_line_and_exit_2_everywhere(command, argv, tmp_path, capsys):
    import importlib

    main = importlib.import_module(command).main
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    assert main([*argv, "--model", str(tmp_path / "nonexistent")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("error: ") and "nonexistent" in error[-1] and "Traceback" not in "\n".join(error)


@pytest.mark.parametrize(
    "spec, message",
    [("fixed:0", "a rank must be an integer >= 1"), ("fixed:-4", "a rank must be"), ("fixed:", "no parameter"),
     ("layers:4,x", "a rank must be"), ("energy:nan", "must lie in (0, 1]"), ("energy:2", "must lie in (0, 1]"),
     ("gumbel:-1", "finite number > 0"), ("hindsight:fisher:0", "the sample count must be")],
)  # fmt: skip
def test_every_policy_spec_is_checked_where_it_is_parsed(spec, message, capsys):
    from agents import generate
    from agents.zoo import check_policy_spec

    with pytest.raises(ValueError, match=re.escape(message)):
        check_policy_spec(spec, "--policy")
    line = in_process(generate.main, ["--policy", spec, "--model", "/no/model/needed"], capsys)
    assert message in line  # the same line in every command, before any model is loaded


def test_generation_lengths_are_checked_against_the_model_before_any_work(tiny_model_dir, capsys):
    from agents import generate

    common = ["--policy", "fixed:8", "--model", tiny_model_dir, "--ranks", "4", "8", "16"]
    line = in_process(generate.main, [*common, "--prompt", "The history of the city", "--max-new-tokens", "1000000"],
                      capsys)  # fmt: skip
    assert "plus --max-new-tokens is 1000005 tokens" in line and "at most 256" in line
    assert "a prompt needs at least 2" in in_process(generate.main, [*common, "--prompt", "a"], capsys)


def test_a_seq_len_beyond_the_models_positions_is_refused_in_its_terms(tiny_model_dir):
    import gymnasium as gym

    with pytest.raises(ValueError, match="seq_len is 300 tokens; the model .* attends over at most 256"):
        gym.make("DRRL-Attention-PerLayer-v0", model=tiny_model_dir, ranks=(4, 8, 16), seq_len=300)
