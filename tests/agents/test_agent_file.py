import base64
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import drrl_env  # noqa: F401  (registers the env)
from agents.agent_file import (
    AgentFileError,
    load_agent_into,
    load_model_policy,
    load_policy,
    read_description,
    save_agent,
)
from agents.algorithms import ALGORITHMS, get_algorithm
from agents.networks import policy_setup
from agents.zoo import make_policy
from tests.conftest import ROOT, layer_mdp


@pytest.fixture
def tiny_kwargs(tiny_model_dir):
    return layer_mdp(model=tiny_model_dir, ranks=(4, 8, 12, 16), seq_len=32, segment_len=8)


class _RunsCode:
    """A pickle that creates a file when unpickled: what a crafted model file can do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _crafted_sb3_zip(kwargs: dict, path: Path, marker: Path) -> Path:
    from sb3_contrib import MaskablePPO

    MaskablePPO("MlpPolicy", gym.make("DRRL-Attention-v0", **kwargs), seed=0).save(path)
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    data = json.loads(members["data"])
    data["gamma"] = {
        ":type:": "<class 'float'>",
        ":serialized:": base64.b64encode(pickle.dumps(_RunsCode(marker))).decode(),
    }
    members["data"] = json.dumps(data).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


def _observations(space: gym.spaces.Box, count: int = 8) -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (count, *space.shape)).astype(np.float32)


@pytest.mark.expensive
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_round_trips_through_an_agent_file(name, tiny_kwargs, tmp_path):
    algorithm = get_algorithm(name)
    setup = policy_setup("mlp")
    env = gym.make("DRRL-Attention-v0", **tiny_kwargs)
    extra = {"n_steps": 8} if algorithm.on_policy else {"buffer_size": 100}
    model = algorithm.make(env, setup, seed=0, logdir=None, **extra)
    path = save_agent(model, tmp_path / "agent")
    assert path.suffix == ".safetensors" and read_description(path).algo == name
    policy, description = load_policy(path)
    assert description.observation_space["type"] == "Box"
    observations = _observations(model.observation_space)
    if algorithm.recurrent:
        starts = np.ones(len(observations), dtype=bool)
        expected, _ = model.policy.predict(observations, episode_start=starts, deterministic=True)
        actual, _ = policy.predict(observations, episode_start=starts, deterministic=True)
    else:
        expected, _ = model.policy.predict(observations, deterministic=True)
        actual, _ = policy.predict(observations, deterministic=True)
    np.testing.assert_array_equal(actual, expected)
    fresh = algorithm.make(env, setup, seed=1, logdir=None, **extra)
    load_agent_into(fresh, path)
    for (key, a), b in zip(model.policy.state_dict().items(), fresh.policy.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_transformer_agent_rebuilds_its_window(tiny_kwargs, tmp_path):
    setup = policy_setup("transformer", 4)
    env = setup.wrap(gym.make("DRRL-Attention-v0", **tiny_kwargs))
    model = get_algorithm("maskable_ppo").make(env, setup, seed=0, logdir=None, n_steps=8, batch_size=8)
    spec_policy = load_model_policy(str(save_agent(model, tmp_path / "t.safetensors")))
    assert spec_policy.setup.history == 4 and spec_policy.algorithm.name == "maskable_ppo"
    observations = torch.as_tensor(_observations(model.observation_space))
    torch.testing.assert_close(
        spec_policy.policy.get_distribution(observations).distribution.logits,
        model.policy.get_distribution(observations).distribution.logits,
    )


@pytest.mark.expensive
def test_a_crafted_sb3_zip_is_refused_without_trust_pickle(tiny_kwargs, tmp_path):
    marker = tmp_path / "code-ran"
    path = _crafted_sb3_zip(tiny_kwargs, tmp_path / "evil.zip", marker)
    with pytest.raises(AgentFileError, match="--trust-pickle"):
        make_policy(str(path), tiny_kwargs)
    out = subprocess.run(
        [sys.executable, "-m", "agents.evaluate", "--policies", str(path), "--model", tiny_kwargs["model"],
         "--out", str(tmp_path / "results"), "--fig4-lengths"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and last.startswith("error: ") and "--trust-pickle" in last
    assert not marker.exists()
    make_policy(str(path), tiny_kwargs, trust_pickle=True)  # the user's explicit choice: SB3 unpickles it
    assert marker.exists()


def test_bad_agent_files_get_errors_that_name_them(tiny_kwargs, tmp_path):
    env = gym.make("DRRL-Attention-v0", **tiny_kwargs)
    model = get_algorithm("maskable_ppo").make(env, policy_setup("mlp"), seed=0, logdir=None, n_steps=8)
    path = save_agent(model, tmp_path / "agent")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(AgentFileError, match="truncated.safetensors.*not a readable safetensors file"):
        load_policy(truncated)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(AgentFileError, match="not a drrl agent"):
        load_policy(plain)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_policy(tmp_path / "missing.safetensors")
    other = gym.make("DRRL-Attention-v0", **{**tiny_kwargs, "ranks": (4, 8)})
    smaller = get_algorithm("maskable_ppo").make(other, policy_setup("mlp"), seed=0, logdir=None, n_steps=8)
    with pytest.raises(AgentFileError, match="action space"):
        load_agent_into(smaller, path)
    with pytest.raises(AgentFileError, match="holds a maskable_ppo agent, not ppo"):
        load_model_policy(f"ppo:{path}")


def test_a_header_that_lies_about_the_action_space_is_refused_before_building(tiny_kwargs, tmp_path):
    import json as json_module

    import safetensors.torch
    from sb3_contrib import MaskablePPO

    env = gym.make("DRRL-Attention-v0", **tiny_kwargs)
    path = save_agent(MaskablePPO("MlpPolicy", env, seed=0), tmp_path / "agent")
    tensors = safetensors.torch.load_file(path)
    with safetensors.safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    key = next(k for k in metadata if metadata[k].startswith("{"))
    header = json_module.loads(metadata[key])
    header["action_space"]["n"] = 2_000_000
    metadata[key] = json_module.dumps(header)
    safetensors.torch.save_file(tensors, tmp_path / "lying.safetensors", metadata)
    with pytest.raises(AgentFileError, match="declares 2000000 action logits, its action head has 4"):
        make_policy(str(tmp_path / "lying.safetensors"), tiny_kwargs)
