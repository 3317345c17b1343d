import json
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

import drrl_env  # noqa: F401  (registers the env)
from oracle import DatasetMismatchError, GreedyOracle, load_trajectories, read_metadata, record_trajectories
from oracle.dataset import DatasetCorruptError, check_dataset_fits_env
from tests.conftest import PAPER_MDP


class RandomAllowed:
    """A seeded stochastic policy, to check that resuming reseeds episodes exactly."""

    name = "random-allowed"

    def reset(self, seed):
        self.rng = np.random.default_rng(seed)

    def act(self, observation, action_mask, env):
        return int(self.rng.choice(np.flatnonzero(action_mask)))


class Interrupting(RandomAllowed):
    """Raises KeyboardInterrupt at its ``stop_after``-th action (a run killed mid-shard)."""

    def __init__(self, stop_after):
        self.calls, self.stop_after = 0, stop_after

    def act(self, observation, action_mask, env):
        self.calls += 1
        if self.calls == self.stop_after:
            raise KeyboardInterrupt
        return super().act(observation, action_mask, env)


@pytest.fixture
def oracle_env_kwargs(tiny_env_kwargs):
    # eps0 small enough that the guardrail masks some ranks; no annealing, so a replay sees the same mask
    return {**tiny_env_kwargs, **PAPER_MDP, "eps0": 0.3, "eps_decay": 0.0, "segment_len": 16}


@pytest.mark.parametrize("mode", ["separate", "joint"])
def test_batched_candidate_rewards_equal_the_step_reward_and_the_oracle_is_best(oracle_env_kwargs, mode):
    """Replay each step's prefix in a second env and take every allowed rank: the batched estimate is the reward."""
    kwargs = {**oracle_env_kwargs, "spectral_mode": mode}
    env = gym.make("DRRL-Attention-v0", **kwargs).unwrapped
    replay = gym.make("DRRL-Attention-v0", **kwargs).unwrapped
    oracle = GreedyOracle()
    obs, _ = env.reset(seed=3)
    prefix, terminated, masked_seen = [], False, False
    while not terminated:
        mask = env.action_masks()
        masked_seen |= not mask.all()
        candidates = env.candidate_rewards()
        np.testing.assert_array_equal(candidates.allowed, mask)
        choice = oracle.act(obs, mask, env)
        assert mask[choice]
        for action in np.flatnonzero(mask):
            replay.reset(seed=3)
            for earlier in prefix:
                replay.step(earlier)
            _, reward, _, _, info = replay.step(action)
            assert not info["masked_violation"]
            assert reward == pytest.approx(candidates.reward[action], abs=1e-6)
            assert candidates.reward[choice] >= reward - 1e-6
        obs, _, terminated, _, _ = env.step(choice)
        prefix.append(choice)
    assert masked_seen, "the test should exercise the mask; lower eps0"
    assert len(prefix) == 2 * 2  # 2 layers x 2 segments


def test_dataset_round_trip_and_oracle_actions_are_allowed(tmp_path, oracle_env_kwargs):
    dataset = record_trajectories(tmp_path / "ds", GreedyOracle(), 3, oracle_env_kwargs, seed=5, progress=False)
    assert dataset.num_rows == 3 * 4
    assert dataset["episode"] == [e for e in range(3) for _ in range(4)]
    assert dataset["seed"] == [5 + e for e in range(3) for _ in range(4)]
    for row in dataset:
        assert row["action_mask"][row["action"]]
        assert row["rank"] == oracle_env_kwargs["ranks"][row["action"]]
        terms = sum(row[f"reward_{t}"] for t in ("fidelity", "flops", "perturbation", "violation", "terminal"))
        assert row["reward"] == pytest.approx(terms)
        assert row["reward_violation"] == 0.0
    metadata = read_metadata(tmp_path / "ds")
    assert metadata["env_config"]["ranks"] == [4, 8, 12, 16] and metadata["policy"] == "greedy"
    from datasets import load_dataset

    same = load_dataset("parquet", data_dir=str(tmp_path / "ds" / "data"), split="train")
    assert same["reward"] == dataset["reward"]
    assert load_trajectories(tmp_path / "ds")["observation"] == dataset["observation"]


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, oracle_env_kwargs, capsys):
    kwargs = {**oracle_env_kwargs, "eps_decay": 0.05}  # the guardrail clock matters across episodes
    whole = record_trajectories(tmp_path / "whole", RandomAllowed(), 5, kwargs, 1, episodes_per_shard=2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        record_trajectories(tmp_path / "cut", Interrupting(stop_after=11), 5, kwargs, 1, 2, progress=False)
    assert len(list((tmp_path / "cut" / "data").glob("*.parquet"))) == 1  # shard 1 was cut, no partial file
    assert not [p for p in (tmp_path / "cut").rglob("*") if p.name.startswith(".")]  # no temporary file left
    assert len(set(load_trajectories(tmp_path / "cut")["episode"])) == 2  # what it holds, and a warning that says so
    assert "holds 2 of its 5 episodes (still being written, or cut off)" in capsys.readouterr().err
    record_trajectories(tmp_path / "cut", RandomAllowed(), 3, kwargs, 1, 2, progress=False)  # resume, short
    resumed = record_trajectories(tmp_path / "cut", RandomAllowed(), 5, kwargs, 1, 2, progress=False)  # and grow
    assert resumed.to_dict() == whole.to_dict()


def _flip(path, start=300, count=40):
    data = bytearray(path.read_bytes())
    data[start : start + count] = bytes(255 - b for b in data[start : start + count])
    path.write_bytes(bytes(data))


@pytest.mark.expensive
def test_corrupted_shards_are_refused_on_load_and_recomputed_on_resume(tmp_path, oracle_env_kwargs):
    directory = tmp_path / "ds"
    record_trajectories(directory, RandomAllowed(), 4, oracle_env_kwargs, 1, episodes_per_shard=2, progress=False)
    shard = directory / "data" / "shard-00001.parquet"
    original = shard.read_bytes()
    _flip(shard)
    with pytest.raises(DatasetCorruptError, match="shard-00001.parquet does not match its recorded SHA-256"):
        load_trajectories(directory)
    bc = subprocess.run(
        [sys.executable, "-m", "agents.bc", "--dataset", str(directory), "--out", str(tmp_path / "m")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bc.returncode == 2 and "shard-00001.parquet does not match" in bc.stderr.strip().splitlines()[-1]
    stale = directory / "data" / ".shard-00002.parquet.abcd1234.parquet"  # what a kill mid-write leaves
    stale.write_bytes(b"partial")
    record_trajectories(directory, RandomAllowed(), 4, oracle_env_kwargs, 1, episodes_per_shard=2, progress=False)
    assert shard.read_bytes() == original and not stale.exists()
    shard.write_bytes(b"")  # empty
    with pytest.raises(DatasetCorruptError, match="shard-00001.parquet"):
        load_trajectories(directory)
    (directory / "checksums.json").unlink()  # deleted checksums: refused unless the user says --no-verify
    with pytest.raises(DatasetCorruptError, match="has no checksums.json.*pass --no-verify"):
        load_trajectories(directory)
    with pytest.raises(DatasetCorruptError, match="shard-00001.parquet is not a readable parquet file"):
        load_trajectories(directory, verify=False)  # unverified, and still a named error


@pytest.mark.parametrize("content", ['{"format": "drrl-traj', "[1, 2]", ""])
def test_broken_metadata_gets_a_one_line_error(content, tmp_path, oracle_env_kwargs):
    directory = tmp_path / "ds"
    record_trajectories(directory, RandomAllowed(), 1, oracle_env_kwargs, progress=False)
    (directory / "metadata.json").write_text(content)
    with pytest.raises(DatasetCorruptError, match="metadata.json") as error:
        load_trajectories(directory)
    assert "\n" not in str(error.value)
    with pytest.raises(DatasetCorruptError, match="metadata.json"):
        record_trajectories(directory, RandomAllowed(), 1, oracle_env_kwargs, progress=False)


def test_other_configuration_is_refused_and_nothing_is_overwritten(tmp_path, oracle_env_kwargs):
    record_trajectories(tmp_path / "ds", GreedyOracle(), 1, oracle_env_kwargs, progress=False)
    before = {p: p.read_bytes() for p in (tmp_path / "ds").rglob("*") if p.is_file()}
    with pytest.raises(DatasetMismatchError, match="beta: stored 0.5, requested 0.9"):
        record_trajectories(tmp_path / "ds", GreedyOracle(), 2, {**oracle_env_kwargs, "beta": 0.9}, progress=False)
    with pytest.raises(DatasetMismatchError, match="policy"):
        record_trajectories(tmp_path / "ds", RandomAllowed(), 1, oracle_env_kwargs, progress=False)
    after = {p: p.read_bytes() for p in (tmp_path / "ds").rglob("*") if p.is_file()}
    assert after == before
    # cloning from it: reward options may differ, what an observation or an action means may not
    check_dataset_fits_env(tmp_path / "ds", {**oracle_env_kwargs, "beta": 0.9, "corpus": "news"}, "--bc-dataset")
    other_mode = "joint" if oracle_env_kwargs.get("spectral_mode", "separate") == "separate" else "separate"
    with pytest.raises(DatasetMismatchError, match=f"--spectral-mode: dataset '[a-z]+', here '{other_mode}'"):
        check_dataset_fits_env(tmp_path / "ds", {**oracle_env_kwargs, "spectral_mode": other_mode}, "--bc-dataset")
    with pytest.raises(DatasetMismatchError, match=r"--bc-dataset .*--ranks: dataset \[4, 8, 12, 16\], here \(4, 8\)"):
        check_dataset_fits_env(tmp_path / "ds", {**oracle_env_kwargs, "ranks": (4, 8)}, "--bc-dataset")
    # the device is not part of the setup (the warm start's cache key leaves it out): 'cpu' extends on 'auto'
    kwargs = {k: v for k, v in oracle_env_kwargs.items() if k != "device"}
    record_trajectories(tmp_path / "dev", GreedyOracle(), 1, {**kwargs, "device": "cpu"}, progress=False)
    grown = record_trajectories(tmp_path / "dev", GreedyOracle(), 2, {**kwargs, "device": "auto"}, progress=False)
    assert read_metadata(tmp_path / "dev")["episodes"] == 2 and len(set(grown["seed"])) == 2


@pytest.mark.expensive
def test_oracle_command(tmp_path, tiny_model_dir, capsys):
    from oracle.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    help_text = capsys.readouterr().out
    assert (
        exit_info.value.code == 0 and "--episodes" in help_text and "--out" in help_text and "--guardrail" in help_text
    )
    out = tmp_path / "ds"
    common = ["--out", str(out), "--model", tiny_model_dir, "--seq-len", "32", "--env", "DRRL-Attention-PerLayer-v0"]
    ranks = ["--ranks", "4", "8", "16"]
    done = subprocess.run(
        [sys.executable, "-m", "oracle", *common, *ranks, "--episodes", "2"], capture_output=True, text=True
    )  # fmt: skip  (the module entry point, once)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "metadata.json").read_text())["episodes"] == 2
    assert main([*common, "--ranks", "4", "8", "--episodes", "2"]) == 2
    assert "ranks: stored [4, 8, 16], requested [4, 8]" in capsys.readouterr().err
    hindsight = tmp_path / "hindsight"
    command = ["--out", str(hindsight), *common[2:], *ranks, "--episodes", "1", "--policy", "hindsight"]
    for estimate in ("exact", "fisher"):
        assert main([*command, "--estimate", estimate, "--reward", "kl"]) == 0, capsys.readouterr().err[-2000:]
        assert json.loads((hindsight / "metadata.json").read_text())["policy"] == f"hindsight:{estimate}".replace(
            ":exact", ""
        )
        rows = load_trajectories(hindsight)
        assert list(rows["reward_fidelity"]) == [0.0] * len(rows)  # the kl reward: no Eq. 13 terms,
        assert rows["reward_terminal"][-1] < 0  # but -KL at the end
        hindsight = tmp_path / "hindsight-fisher"
        command[command.index("--out") + 1] = str(hindsight)
    capsys.readouterr()
    assert main([*common, *ranks, "--episodes", "2", "--estimate", "fisher"]) == 2
    assert "--estimate belongs to --policy hindsight" in capsys.readouterr().err


def test_lookahead_oracle_maximises_its_two_step_value(oracle_env_kwargs):
    """Brute force at step 1: lookahead=1 picks the allowed a_t with the best r_t + greedy r_t+1."""
    env = gym.make("DRRL-Attention-v0", **oracle_env_kwargs).unwrapped
    brute = gym.make("DRRL-Attention-v0", **oracle_env_kwargs).unwrapped
    oracle = GreedyOracle(lookahead=1)
    assert oracle.name == "greedy:lookahead=1"
    obs, _ = env.reset(seed=4)
    oracle.reset(4)
    first = oracle.act(obs, env.action_masks(), env)
    obs, *_ = env.step(first)
    mask = env.action_masks()
    second = oracle.act(obs, mask, env)
    assert mask[second]
    values = {}
    for candidate in np.flatnonzero(mask):
        brute.reset(seed=4)
        brute.step(first)
        _, reward, *_ = brute.step(candidate)
        greedy_next = brute.candidate_rewards()
        values[candidate] = reward + np.max(np.where(brute.action_masks(), greedy_next.reward, -np.inf))
    assert values[second] == pytest.approx(max(values.values()), abs=1e-9)


@pytest.mark.expensive
def test_baselines_record_through_the_same_writer(tmp_path, tiny_model_dir, capsys):
    from agents.record import main

    common = ["--model", tiny_model_dir, "--seq-len", "32", "--ranks", "4", "8", "16", "--episodes", "2",
              "--env", "DRRL-Attention-PerLayer-v0", "--flops-budget", "none", "--guardrail", "eq9"]  # fmt: skip
    for spec in ("fixed:8", "energy:0.9", "random"):
        out = tmp_path / spec.replace(":", "_")
        argv = ["--policy", spec, "--out", str(out), *common]
        if spec == "fixed:8":  # the module entry point, once
            done = subprocess.run([sys.executable, "-m", "agents.record", *argv], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-2000:]
        else:
            assert main(argv) == 0
        assert read_metadata(out)["policy"] == spec
        dataset = load_trajectories(out)
        assert dataset.num_rows == 2 * 2 and all(row["action_mask"][row["action"]] for row in dataset)
        if spec == "fixed:8":
            assert set(dataset["rank"]) <= {8, 16}  # 8, or the guardrail's nearest allowed rank
    capsys.readouterr()
    assert main(["--policy", "fixd:8", "--out", str(tmp_path / "x"), *common]) == 2
    assert "neither an existing agent file nor a baseline" in capsys.readouterr().err  # before the model loads


def test_teacher_folder_is_keyed_by_the_env_configuration(tmp_path, monkeypatch):
    from agents.warm_start import teacher_folder

    monkeypatch.setenv("DRRL_CACHE_DIR", str(tmp_path))
    base = dict(model="some/model", seq_len=32, ranks=(4, 8, 16))
    folder = teacher_folder({**base, "device": "cpu"})
    assert folder.parent == tmp_path / "datasets" and folder.name.startswith("hindsight-fisher-")
    assert teacher_folder({**base, "device": "cuda"}) == folder  # the device does not change the episodes
    assert teacher_folder({**base, "seq_len": 64}) != folder
    assert teacher_folder({**base, "flops_budget": 0.5}) != folder
    assert teacher_folder(base, "exact") != folder
    assert teacher_folder({**base, "kl_shaping_weight": 0.0, "kl_baseline": "uniform"}) == folder  # rewards only


def test_greedy_oracle_plays_its_joint_candidate_in_every_group_of_a_per_head_env(oracle_env_kwargs):
    kwargs = {**oracle_env_kwargs, "guardrail": "off"}
    env = gym.make("DRRL-Attention-v0", **{**kwargs, "per_head": True}).unwrapped
    layered = gym.make("DRRL-Attention-v0", **kwargs).unwrapped
    oracle, reference = GreedyOracle(), GreedyOracle()
    obs, _ = env.reset(seed=2)
    layered_obs, _ = layered.reset(seed=2)
    terminated = False
    while not terminated:
        action = oracle.act(obs, env.action_masks(), env)
        expected = reference.act(layered_obs, layered.action_masks(), layered)
        np.testing.assert_array_equal(action, [expected] * env.kv_heads)
        obs, _, terminated, _, info = env.step(action)
        layered_obs, *_ = layered.step(expected)
        assert not info["masked_violation"]
    with pytest.raises(ValueError, match="lookahead needs one rank per layer"):
        env.reset(seed=2)
        GreedyOracle(lookahead=1).act(obs, env.action_masks(), env)
