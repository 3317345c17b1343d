import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from agents.agent_file import read_description

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=ENV)


def test_help_explains_every_option():
    out = run("train_agent.py", "--help")
    assert out.returncode == 0
    flags = (
        "--algo", "--total-timesteps", "--seed", "--n-envs", "--vec", "--bc-dataset", "--bc-model", "--policy",
        "--model", "--corpus", "--seq-len", "--segment-len", "--ranks", "--alpha", "--beta", "--gamma", "--eps0",
        "--eps-decay", "--guardrail", "--flops-budget", "--reward", "--kl-shaping-weight",
        "--terminal-lm-weight", "--per-head", "--logdir", "--checkpoint-every",
        "--resume", "--spectral-mode",
    )  # fmt: skip
    for flag in flags:
        assert flag in out.stdout, flag


def tiny_options(model_dir: str) -> list[str]:
    return ["--model", model_dir, "--ranks", "4", "8", "12", "16", "--seq-len", "32", "--segment-len", "8",
            "--device", "cpu"]  # fmt: skip


def test_train_agent_smoke(tiny_model_dir, tmp_path):
    out = run(
        "train_agent.py", *tiny_options(tiny_model_dir), "--total-timesteps", "64", "--n-steps", "32",
        "--eval-episodes", "1", "--eval-every", "32", "--compare", "full", "fixed:8", "--logdir", str(tmp_path),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "maskable_ppo (this run)" in out.stdout and "| fixed:8 |" in out.stdout
    (run_dir,) = tmp_path.glob("DRRL-Attention-v0__maskable_ppo__0__*")
    assert (run_dir / "model.safetensors").is_file() and (run_dir / "config.json").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(run_dir)).Reload().Tags()
    for tag in ("drrl/fidelity", "drrl/flops_saved", "drrl/mask_rate", "drrl/violation_rate", "eval/ppl",
                "drrl/reward_terms/shaping", "drrl/kl", "drrl/flops_logits_ratio",
                "drrl/guardrail_mask_rate"):  # fmt: skip
        assert tag in tags["scalars"], tag
    assert "drrl/rank_histogram" in tags["histograms"] and "drrl/rank_heatmap" in tags["images"]
    from agents.figures import training_curves_figure

    figure = training_curves_figure(tmp_path)  # Fig. 2 from the run's event files
    assert figure is not None and any(axis.lines for axis in figure.axes)


def test_bad_arguments_get_a_clear_error(tmp_path):
    out = run("train_agent.py", "--algo", "ppo", "--bc-model", "x.zip", "--logdir", str(tmp_path))
    assert out.returncode == 2 and "warm-start maskable_ppo only" in out.stderr
    out = run("train_agent.py", "--resume", str(tmp_path))
    assert out.returncode == 2 and "not a run folder" in out.stderr


def test_resume_gives_the_same_model_as_an_uninterrupted_run(tiny_model_dir, tmp_path):
    options = [*tiny_options(tiny_model_dir), "--n-steps", "32", "--checkpoint-every", "64", "--compare",
               "--eps-decay", "0.01"]  # fmt: skip
    whole = run("train_agent.py", *options, "--total-timesteps", "128", "--logdir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    cut = run("train_agent.py", *options, "--total-timesteps", "64", "--logdir", str(tmp_path / "cut"))
    assert cut.returncode == 0, cut.stderr[-2000:]
    (cut_dir,) = (tmp_path / "cut").iterdir()
    resumed = run("train_agent.py", *options, "--total-timesteps", "128", "--resume", str(cut_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout
    (whole_dir,) = (tmp_path / "whole").iterdir()
    a, b = load_file(whole_dir / "model.safetensors"), load_file(cut_dir / "model.safetensors")
    halfway = load_file(cut_dir / "checkpoints" / "step_000000064.safetensors")
    assert read_description(whole_dir / "model.safetensors").num_timesteps == 128
    assert read_description(cut_dir / "model.safetensors").num_timesteps == 128
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert any(not torch.equal(a[name], halfway[name]) for name in a)
    assert len(list(cut_dir.glob("events.out.tfevents.*"))) == 2  # the curves continue in the same run folder
