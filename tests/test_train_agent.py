import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from agents.agent_file import read_description
from drrl_env.lm.files import sha256_of
from tests.conftest import ROOT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env={**ENV, **env})


@pytest.mark.expensive
def test_help_explains_every_option():
    out = run("train_agent.py", "--help")
    assert out.returncode == 0
    flags = (
        "--algo", "--total-timesteps", "--seed", "--n-envs", "--vec", "--bc-dataset", "--bc-model", "--network",
        "--model", "--corpus", "--seq-len", "--segment-len", "--ranks", "--alpha", "--beta", "--gamma", "--eps0",
        "--eps-decay", "--guardrail", "--flops-budget", "--reward", "--kl-shaping-weight",
        "--terminal-lm-weight", "--per-head", "--logdir", "--checkpoint-every",
        "--resume", "--spectral-mode",
    )  # fmt: skip
    for flag in flags:
        assert flag in out.stdout, flag


def tiny_options(model_dir: str) -> list[str]:
    """The per-layer env (every algorithm takes its Discrete actions) on the tiny model, no warm start."""
    return ["--env", "DRRL-Attention-PerLayer-v0", "--model", model_dir, "--ranks", "4", "8", "12", "16",
            "--seq-len", "32", "--segment-len", "8", "--device", "cpu", "--warm-start", "none"]  # fmt: skip


@pytest.mark.expensive
def test_train_agent_smoke(tiny_model_dir, tmp_path):
    options = [*tiny_options(tiny_model_dir), "--warm-start", "hindsight", "--warm-start-episodes", "4",
               "--hyperparams", '{"learning_rate": 1e-4, "target_kl": 0.02}', "--sensitivity-samples", "2"]  # fmt: skip
    out = run(
        "train_agent.py", *options, "--total-timesteps", "64", "--n-steps", "32", "--eval-episodes", "1",
        "--eval-every", "32", "--compare", "full", "fixed:8", "--logdir", str(tmp_path / "runs"),
        "--run-name", "smoke", DRRL_CACHE_DIR=str(tmp_path / "cache"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "maskable_ppo (this run)" in out.stdout and "| fixed:8 |" in out.stdout
    assert "behaviour cloning: held-out agreement with the teacher" in out.stdout
    # the teacher, BC and PPO see the observation's sensitivity part; the comparison charges its profile to the agent
    lines = [line.split("|") for line in out.stdout.splitlines() if line.startswith("| ")]
    column = [cell.strip() for cell in lines[0]].index("FLOPs (+overhead +policy)")
    policy_flops = {cells[1].strip(): float(cells[column]) for cells in lines[1:]}
    assert policy_flops["maskable_ppo (this run)"] > 10 * policy_flops["fixed:8"]  # 5 passes of the whole model
    (teacher,) = (tmp_path / "cache" / "datasets").glob("hindsight-fisher-*")
    assert json.loads((teacher / "metadata.json").read_text())["episodes"] == 4
    run_dir = tmp_path / "runs" / "smoke"  # --run-name
    assert (run_dir / "model.safetensors").is_file() and (run_dir / "config.json").is_file()
    assert (run_dir / "bc_model.safetensors").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(run_dir)).Reload().Tags()
    for tag in ("drrl/fidelity", "drrl/flops_saved", "drrl/mask_rate", "drrl/violation_rate", "eval/ppl",
                "drrl/reward_terms/shaping", "drrl/kl", "drrl/flops_logits_ratio",
                "drrl/guardrail_mask_rate"):  # fmt: skip
        assert tag in tags["scalars"], tag
    assert "drrl/rank_histogram" in tags["histograms"] and "drrl/rank_heatmap" in tags["images"]
    assert "custom_scalars__config__" in tags["tensors"]  # the layout: drrl/ beside rollout/ and train/
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    hparams = EventMultiplexer().AddRunsFromDirectory(str(run_dir)).Reload().PluginRunToTagToContent("hparams")
    assert "_hparams_/session_start_info" in hparams["."] and "hparams/test_kl" in tags["scalars"]  # HParams tab
    from agents.figures import training_curves_figure

    figure = training_curves_figure(tmp_path / "runs")  # Fig. 2 from the run's event files
    assert figure is not None and any(axis.lines for axis in figure.axes)


def test_bad_arguments_get_a_clear_error(tmp_path, capsys):
    from train_agent import main

    def refused(*argv: str) -> str:
        assert main(list(argv)) == 2
        return capsys.readouterr().err

    assert "warm-start maskable_ppo only" in refused("--algo", "ppo", "--bc-model", "x.zip", "--logdir", str(tmp_path))
    assert "not a run folder" in refused("--resume", str(tmp_path))
    assert "--run-name 'a/b': expected one folder name" in refused("--run-name", "a/b", "--logdir", str(tmp_path))
    assert "--compare 'none': neither an existing agent file nor a baseline" in refused(
        "--compare", "uniform", "none", "--logdir", str(tmp_path)
    )  # refused before training, not after
    for spec, message in (("static:match", "static takes a budget"), ("static:1.5", "got '1.5'"),
                          ("fixed:abc", "bad parameter in policy spec 'fixed:abc'")):  # fmt: skip
        line = refused("--compare", spec, "--logdir", str(tmp_path))  # before training, not after
        assert "--compare: " in line and message in line
    missing = refused("--compare", "x.safetensors", "--logdir", str(tmp_path))
    assert "--compare x.safetensors: no such agent file" in missing
    (tmp_path / "taken").mkdir()
    assert "taken exists" in refused("--run-name", "taken", "--logdir", str(tmp_path))
    for hyperparams, message in (("{lr: 1}", "is not JSON"), ("[1]", "must be a JSON object"),
                                 ('{"learning_rat": 1e-4}', "MaskablePPO takes no ['learning_rat']")):  # fmt: skip
        assert message in refused("--hyperparams", hyperparams, "--logdir", str(tmp_path))


@pytest.mark.expensive
@pytest.mark.parametrize(
    "algo",
    ["maskable_ppo", "dqn", "maskable_ppo --vec batched --n-envs 2"],  # dqn: replay buffer and exploration RNG too
)  # batched: the native vector env's episode positions
def test_resume_gives_the_same_model_as_an_uninterrupted_run(algo, tiny_model_dir, tmp_path):
    options = [*tiny_options(tiny_model_dir), "--n-steps", "32", "--checkpoint-every", "64", "--compare",
               "--eps-decay", "0.01", "--algo", *algo.split()]  # fmt: skip
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


class _RunsCode:
    """A pickle that creates a file when unpickled: what a crafted state file can do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.mark.expensive
def test_resume_checks_options_and_checkpoints(tiny_model_dir, tmp_path):
    options = [*tiny_options(tiny_model_dir), "--n-steps", "16", "--checkpoint-every", "32", "--compare"]
    first = run("train_agent.py", *options, "--total-timesteps", "64", "--logdir", str(tmp_path))
    assert first.returncode == 0, first.stderr[-2000:]
    (run_dir,) = tmp_path.iterdir()
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*.json")) == ["step_000000032.json", "step_000000064.json"]

    other = run("train_agent.py", "--resume", str(run_dir), "--seq-len", "16", "--algo", "ppo", "--ranks", "4", "8")
    line = _last_line(other.stderr)
    assert other.returncode == 2 and line.startswith("error: ")
    assert "--seq-len (run: 32, given: 16)" in line and "--algo" in line and "--ranks" in line

    state = checkpoints / "step_000000064.state.pt"
    data = bytearray(state.read_bytes())
    data[200:240] = bytes(255 - b for b in data[200:240])  # 40 flipped bytes
    state.write_bytes(bytes(data))
    stale = checkpoints / ".step_000000080.safetensors.x1y2z3.safetensors"  # what a kill mid-write leaves
    stale.write_bytes(b"partial")
    resumed = run("train_agent.py", "--resume", str(run_dir), "--total-timesteps", "80")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "skipping checkpoint step_000000064" in resumed.stderr and "SHA-256" in resumed.stderr
    assert "from step_000000032 (32 steps done)" in resumed.stdout and not stale.exists()

    marker = tmp_path / "code-ran"  # a crafted state file whose checksum was updated to match
    newest = checkpoints / "step_000000080.state.pt"
    torch.save({"optimizer": _RunsCode(marker)}, newest)
    manifest = json.loads((checkpoints / "step_000000080.json").read_text())
    manifest["sha256"]["state"] = sha256_of(newest)
    (checkpoints / "step_000000080.json").write_text(json.dumps(manifest))
    crafted = run("train_agent.py", "--resume", str(run_dir), "--total-timesteps", "96")
    assert crafted.returncode == 2 and "not a readable training state" in _last_line(crafted.stderr)
    assert not marker.exists()


@pytest.mark.expensive
def test_n_steps_must_hold_whole_episodes(tiny_model_dir, tmp_path):
    out = run("train_agent.py", *tiny_options(tiny_model_dir), "--n-steps", "12", "--logdir", str(tmp_path))
    line = _last_line(out.stderr)
    assert out.returncode == 2 and "--n-steps 12 is not a multiple of the episode length 8" in line
    assert not list(tmp_path.iterdir())  # nothing was started


def test_value_warmup_trains_the_critic_only_then_everything():
    """A rollout that starts before --value-warmup-steps updates the critic and leaves the actor as it was."""
    import gymnasium as gym
    import torch
    from stable_baselines3 import PPO

    from agents.training import CRITIC_PREFIXES, ValueWarmupCallback

    model = PPO("MlpPolicy", gym.make("CartPole-v1"), n_steps=64, batch_size=32, n_epochs=2, seed=0)

    def snapshot() -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in model.policy.named_parameters()}

    def changed(before: dict[str, torch.Tensor]) -> tuple[set[str], set[str]]:
        moved = {name for name, p in model.policy.named_parameters() if not torch.equal(p, before[name])}
        critic = {name for name in moved if name.startswith(CRITIC_PREFIXES)}
        return critic, moved - critic

    before = snapshot()
    model.learn(64, callback=ValueWarmupCallback(128))  # one update, inside the warm-up
    critic, actor = changed(before)
    assert critic and not actor
    before = snapshot()
    model.learn(64, callback=ValueWarmupCallback(128), reset_num_timesteps=False)  # the second, still inside
    assert not changed(before)[1]
    before = snapshot()
    model.learn(64, callback=ValueWarmupCallback(128), reset_num_timesteps=False)  # rollout starts at 128: all train
    critic, actor = changed(before)
    assert critic and actor


def test_value_warmup_is_refused_without_a_critic(tmp_path, capsys):
    from train_agent import main

    assert main(["--algo", "dqn", "--value-warmup-steps", "30", "--logdir", str(tmp_path)]) == 2
    assert "--value-warmup-steps 30: expected 0, or > 0 with an actor-critic algo" in capsys.readouterr().err


def test_bc_temperature_divides_the_logits_and_keeps_the_argmax():
    import gymnasium as gym
    import torch
    from stable_baselines3 import PPO

    from agents.warm_start import scale_action_logits

    model = PPO("MlpPolicy", gym.make("CartPole-v1"), seed=0)
    with torch.no_grad():
        model.policy.action_net.bias.copy_(torch.tensor([0.3, -0.2]))  # a start with a preference to sharpen
    observations = torch.as_tensor(np.random.default_rng(0).normal(size=(64, 4)), dtype=torch.float32)

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return model.policy.get_distribution(observations).distribution.logits

    before = logits()
    scale_action_logits(model.policy, 0.25)
    after = logits()
    # the log-softmax of logits / T: the same argmax, four times the log-odds
    torch.testing.assert_close(after, torch.log_softmax(torch.log_softmax(before, -1) / 0.25, -1), rtol=1e-5, atol=1e-5)
    assert torch.equal(after.argmax(-1), before.argmax(-1))
    assert (after.max(-1).values > before.max(-1).values).all()  # sharper


def test_bc_temperature_is_refused_without_a_warm_start(tmp_path, capsys):
    from train_agent import main

    for argv, value in (
        (["--bc-temperature", "0"], "0.0"),
        (["--bc-temperature", "0.3", "--warm-start", "none"], "0.3"),
    ):
        assert main([*argv, "--logdir", str(tmp_path)]) == 2
        assert (
            f"--bc-temperature {value}: expected a number > 0, != 1 only with a warm start" in capsys.readouterr().err
        )


def test_trust_is_given_on_the_command_line_never_read_from_a_run_folder(tmp_path):
    import json

    from agents.train_config import resume_options
    from train_agent import RESUMABLE_CHANGES, build_parser

    run = tmp_path / "run"
    run.mkdir()
    stored = {"trust_pickle": True, "compare": ["evil.zip"], "seed": 3}
    (run / "config.json").write_text(json.dumps(stored))
    argv = ["--resume", str(run)]
    options = resume_options(build_parser(argv), argv, RESUMABLE_CHANGES, "train_agent.py")
    assert options["trust_pickle"] is False and options["seed"] == 3
    argv = ["--resume", str(run), "--trust-pickle"]
    assert resume_options(build_parser(argv), argv, RESUMABLE_CHANGES, "train_agent.py")["trust_pickle"] is True


@pytest.mark.expensive
def test_inputs_the_comparison_needs_are_checked_before_training(tmp_path, capsys):
    from train_agent import main

    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(f"paragraph {i} of a corpus too small to split." for i in range(3)))
    zip_file = tmp_path / "evil.zip"
    zip_file.write_bytes(b"PK")
    for argv, message in (
        (["--corpus", str(small)], "leave split"),
        (["--compare", str(zip_file)], "pass --trust-pickle"),
    ):
        assert main([*argv, "--logdir", str(tmp_path / "runs")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing was started


@pytest.mark.parametrize("counters", [{"gamma": 5.0}, {"n_epochs": 0}, {"num_timesteps": -1}, {"_n_calls": "x"}])
def test_a_training_state_restores_counters_only(counters, tmp_path):
    import gymnasium as gym
    from stable_baselines3 import PPO

    from agents.checkpoints import CorruptCheckpointError, restore_checkpoint

    model = PPO("MlpPolicy", gym.make("CartPole-v1"), n_steps=64, seed=0)
    state = {"optimizer": {}, "counters": counters, "episode_infos": [], "positions": [], "rng": {}}
    torch.save(state, tmp_path / "state.pt")
    gamma = model.gamma
    with pytest.raises(CorruptCheckpointError, match="is not one a training state restores"):
        restore_checkpoint(model, {"agent": tmp_path / "never-read.safetensors", "state": tmp_path / "state.pt"})
    assert model.gamma == gamma


def test_a_config_edited_after_its_checkpoints_is_refused_on_resume(tmp_path):
    from agents.checkpoints import ConfigChangedError, latest_checkpoint

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"seq_len": 128}))
    manifest = {
        "num_timesteps": 8,
        "sha256": {"agent": "0", "state": "0"},
        "config_sha256": sha256_of(run / "config.json"),
    }
    (run / "checkpoints" / "step_000000008.json").write_text(json.dumps(manifest))
    (run / "config.json").write_text(json.dumps({"seq_len": 16}))  # edited by hand
    with pytest.raises(ConfigChangedError, match="config.json was changed after checkpoint step_000000008"):
        latest_checkpoint(run / "checkpoints")


@pytest.mark.expensive
def test_ctrl_c_saves_what_resume_needs_and_says_so_in_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from sb3_contrib import MaskablePPO

    from train_agent import main

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(MaskablePPO, "learn", interrupted)
    monkeypatch.setenv("DRRL_CACHE_DIR", str(tmp_path / "cache"))
    argv = [*tiny_options(tiny_model_dir), "--n-steps", "16", "--logdir", str(tmp_path / "runs"), "--run-name", "r"]
    assert main(argv) == 130
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("interrupted; python train_agent.py --resume") and "Traceback" not in "\n".join(error)
    assert list((tmp_path / "runs" / "r" / "checkpoints").glob("step_*.json"))  # resumable


def test_a_sample_count_that_would_hang_reset_is_refused():
    from drrl_env.config import EnvConfig

    with pytest.raises(ValueError, match="sensitivity_samples must be an integer <= 1024"):
        EnvConfig(sensitivity_samples=2**40)


TINY_KV = ["--env", "DRRL-KVCache-v0", "--context", "48", "--prompts", "4", "--observe-tokens", "8", "--horizon", "8",
           "--ranks", "4", "8", "12", "16", "--recent-tokens", "4", "--cache-budget", "0.6", "0.75"]  # fmt: skip


@pytest.mark.expensive
def test_train_agent_in_the_key_cache_env(tiny_layered_model_dir, tmp_path):
    """--env DRRL-KVCache-v0: the self-profile teacher's dataset, BC, MaskablePPO, the comparison at both budgets."""
    out = run(
        "train_agent.py", *TINY_KV, "--model", tiny_layered_model_dir, "--warm-start-episodes", "8",
        "--bc-epochs", "5", "--total-timesteps", "16", "--n-steps", "8", "--eval-episodes", "2",
        "--logdir", str(tmp_path / "runs"), "--run-name", "kv", DRRL_CACHE_DIR=str(tmp_path / "cache"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "behaviour cloning: held-out agreement with the teacher" in out.stdout
    assert "(prompts held out)" in out.stdout  # the pool's prompts, not episodes that share them with training
    (teacher,) = (tmp_path / "cache" / "datasets").glob("kv-self_profile-*")
    metadata = json.loads((teacher / "metadata.json").read_text())
    assert metadata["env_id"] == "DRRL-KVCache-v0" and metadata["policy"] == "self_profile"
    from oracle.dataset import load_trajectories

    prompts = np.asarray(load_trajectories(teacher)["prompt"])
    assert set(prompts) <= {0, 1, 2, 3} and len(set(prompts)) >= 2
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| 0.")]
    table = {(cells[0].strip(), cells[1].strip()): [c.strip() for c in cells[2:]] for cells in rows}
    names = ("uniform", "static", "energy", "logit_error", "self_profile", "hindsight", "bc (this run's start)",
             "maskable_ppo (this run)")  # fmt: skip
    assert set(table) == {(budget, name) for budget in ("0.75", "0.6") for name in names}
    for budget in ("0.75", "0.6"):
        assert float(table[budget, "maskable_ppo (this run)"][3]) <= float(budget) + 1e-9  # the key cache used
        assert table[budget, "hindsight"][4] == "- (ceiling)"
    import csv

    with open(tmp_path / "runs" / "kv" / "comparison.csv") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert len(csv_rows) == 16 and all(len(row["kls"].split()) == 2 for row in csv_rows)
    assert (tmp_path / "runs" / "kv" / "model.safetensors").is_file()


def test_the_key_cache_env_refuses_the_attention_options(tmp_path, capsys):
    from train_agent import main

    def refused(*argv: str) -> str:
        assert main([*TINY_KV, *argv, "--logdir", str(tmp_path)]) == 2
        return capsys.readouterr().err

    assert "--warm-start hindsight: DRRL-KVCache-v0 takes one of ('self_profile', 'none')" in refused(
        "--warm-start", "hindsight"
    )
    assert "--preset per-head trains in DRRL-Attention-v0, not in --env DRRL-KVCache-v0" in refused(
        "--preset", "per-head"
    )
    assert "--compare 'fixed:8': expected an agent file or one of" in refused("--compare", "fixed:8")
    assert "--eval-every: DRRL-KVCache-v0's evaluation is the comparison" in refused("--eval-every", "8")
    assert main(["--warm-start", "self_profile", "--logdir", str(tmp_path)]) == 2
    assert "--warm-start self_profile: the teacher of DRRL-KVCache-v0" in capsys.readouterr().err


@pytest.mark.expensive
def test_the_teacher_dataset_and_the_training_compute_each_train_prompt_once(
    tiny_layered_model_dir, tmp_path, monkeypatch
):
    import drrl_env.kvcache as kvcache
    from train_agent import main

    computed = []
    original = kvcache.prompt_state

    def counted(loaded, prompt, config):
        computed.append(tuple(prompt.reshape(-1).tolist()))
        return original(loaded, prompt, config)

    monkeypatch.setattr(kvcache, "prompt_state", counted)
    monkeypatch.setenv("DRRL_CACHE_DIR", str(tmp_path / "cache"))
    argv = [*TINY_KV, "--model", tiny_layered_model_dir, "--warm-start-episodes", "8", "--bc-epochs", "1",
            "--total-timesteps", "16", "--n-steps", "8", "--compare", "--logdir", str(tmp_path / "runs")]  # fmt: skip
    assert main(argv) == 0
    assert len(computed) == len(set(computed)) == 4  # the 4 train prompts, once for the teacher and the training
    assert kvcache._shared_states is None  # noqa: SLF001 - released at the end
