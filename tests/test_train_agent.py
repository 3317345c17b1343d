import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_help_explains_every_option():
    out = subprocess.run([sys.executable, "train_agent.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--total-timesteps", "--seed", "--model", "--ranks", "--spectral-mode", "--no-guardrail", "--logdir"):
        assert flag in out.stdout


def test_train_agent_smoke(tiny_model_dir, tmp_path):
    command = [
        sys.executable, "train_agent.py", "--model", tiny_model_dir, "--ranks", "4", "8", "12", "16",
        "--seq-len", "32", "--total-timesteps", "64", "--n-steps", "32", "--eval-episodes", "1",
        "--logdir", str(tmp_path), "--device", "cpu",
    ]  # fmt: skip
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "MaskablePPO (this run)" in out.stdout and "fixed r=" in out.stdout
    assert list(tmp_path.glob("DRRL-Attention-v0__maskable_ppo__0__*.zip"))
    assert any(tmp_path.glob("DRRL-Attention-v0__maskable_ppo__0__*/events.out.tfevents.*"))
