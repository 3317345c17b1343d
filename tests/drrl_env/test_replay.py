"""Episode records replay exactly, and a tampered record is reported at the step where it diverges."""

import json
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

import drrl_env
from drrl_env.replay import replay


@pytest.fixture
def recorded(tiny_env_kwargs, tmp_path):
    env = gym.make("DRRL-Attention-v0", **tiny_env_kwargs, segment_len=16, flops_budget=(0.4, 0.8)).unwrapped
    env.reset()  # no seed: the record still replays, through its episode seed
    env.set_guardrail_step(50)
    rng = np.random.default_rng(0)
    terminated = False
    while not terminated:
        *_, terminated, _, _ = env.step(int(rng.integers(4)))
    record = json.loads(json.dumps(env.episode_record()))  # as a file would give it back
    path = tmp_path / "record.json"
    path.write_text(json.dumps(record))
    return record, path


def test_a_record_replays_exactly(recorded):
    record, _ = recorded
    assert record["terminated"] and len(record["steps"]) == 4 and record["guardrail_step"] == 50
    assert {"kl", "lm_loss", "lm_loss_full", "budget_used", "episode_seed"} <= set(record)
    result = drrl_env.replay(record)
    assert result.matches and result.steps == 4, result.message


def test_a_tampered_record_diverges_at_the_right_step(recorded):
    record, _ = recorded
    reward_changed = json.loads(json.dumps(record))
    reward_changed["steps"][2]["reward"] += 1e-6
    result = replay(reward_changed)
    assert not result.matches and result.step == 2 and "reward" in result.message
    rank_changed = json.loads(json.dumps(record))
    rank_changed["steps"][1]["rank"] += 4
    result = replay(rank_changed)
    assert not result.matches and result.step == 1 and "rank recorded" in result.message
    kl_changed = {**record, "kl": record["kl"] + 0.5}
    assert "kl" in replay(kl_changed).message
    with pytest.raises(ValueError, match="'episode_seed' is missing"):
        replay({k: v for k, v in record.items() if k != "episode_seed"})


def test_a_cut_or_foreign_record_is_refused_naming_what_is_wrong(recorded, tmp_path, monkeypatch):
    record, _ = recorded
    with pytest.raises(ValueError, match="holds 0 step"):
        replay({**record, "steps": []})
    with pytest.raises(ValueError, match="holds 1 step"):
        replay({**record, "steps": record["steps"][:1]})
    with pytest.raises(ValueError, match="lacks its final 'budget_used'"):
        replay({k: v for k, v in record.items() if k != "budget_used"})
    no_action = json.loads(json.dumps(record))
    del no_action["steps"][1]["action"]
    with pytest.raises(ValueError, match=r"step 1 of the record lacks \['action'\]"):
        replay(no_action)
    (tmp_path / "evilmod.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for env_id in ("evilmod:Foo-v0", "this:Foo-v0", "CartPole-v1"):
        with pytest.raises(ValueError, match="not a registered id of drrl"):
            replay({**record, "env_id": env_id})
    assert not (tmp_path / "ran").exists()  # the module a record names is never imported


@pytest.mark.expensive
def test_replay_command(recorded, tmp_path):
    _, path = recorded
    done = subprocess.run([sys.executable, "-m", "agents.replay", str(path)], capture_output=True, text=True)
    assert done.returncode == 0 and "same ranks and rewards" in done.stdout, done.stderr[-2000:]
    record = json.loads(path.read_text())
    record["steps"][3]["reward_terms"]["terminal"] = 0.0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(record))
    done = subprocess.run([sys.executable, "-m", "agents.replay", str(bad)], capture_output=True, text=True)
    assert done.returncode == 1 and "step 3" in done.stdout and "terminal" in done.stdout
    (tmp_path / "junk.json").write_text("[1, 2")
    done = subprocess.run(
        [sys.executable, "-m", "agents.replay", str(tmp_path / "junk.json")], capture_output=True, text=True
    )
    assert done.returncode == 2 and "cannot read the record" in done.stderr
