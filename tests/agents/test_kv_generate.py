"""python -m agents.generate --env DRRL-KVCache-v0: observe, commit the ranks, generate on (tiny model)."""

import gymnasium as gym
import numpy as np
import pytest

import drrl_env  # noqa: F401 - registers the ids
from drrl_env.kvcache import KVCACHE_ENV_ID
from drrl_env.replay import replay

TINY = ["--observe-tokens", "8", "--horizon", "8", "--ranks", "4", "8", "12", "16", "--recent-tokens", "4",
        "--max-new-tokens", "10", "--cache-budget", "0.6"]  # fmt: skip


@pytest.mark.expensive
def test_generation_with_ranks_committed_after_the_observed_tokens(tiny_layered_model_dir, capsys):
    from agents.generate import main

    argv = ["--env", KVCACHE_ENV_ID, "--model", tiny_layered_model_dir, *TINY, "--policy", "static"]
    assert main([*argv, "--context", "48", "--prompts", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("prompt ") == 2 and "48 tokens, 8 observed; policy static" in out
    ranks = [line.split(":")[1].split() for line in out.splitlines() if line.startswith("ranks per layer")]
    assert all(len(row) == 2 and {int(r) for r in row} <= {4, 8, 12, 16} for row in ranks)
    kls = [float(line.split("KL ")[1].split()[0]) for line in out.splitlines() if "against full attention" in line]
    assert len(kls) == 2 and all(np.isfinite(kl) and kl >= 0 for kl in kls)
    assert main([*argv, "--context", "8", "--prompt", "The history of the city of Rome"]) == 0  # one's own prompt
    assert "policy static" in capsys.readouterr().out
    assert main([*argv, "--context", "8", "--policy", "hindsight"]) == 2
    assert "a ceiling, not a policy" in capsys.readouterr().err
    one = [*argv, "--context", "48", "--prompts", "1", "--no-compare"]
    shown = ("ranks per layer", "text:")
    assert main(one) == 0
    eager = [line for line in capsys.readouterr().out.splitlines() if line.startswith(shown)]
    assert main([*one, "--compile"]) == 0  # the decode steps compiled: the same ranks and the same text
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith(shown)] == eager


def test_an_own_prompt_is_an_episode_that_records_and_replays(tiny_layered_model_dir):
    env = gym.make(KVCACHE_ENV_ID, model=tiny_layered_model_dir, context=16, prompts=1, observe_tokens=8, horizon=8,
                   ranks=(4, 8, 12, 16), recent_tokens=4, cache_budget=0.6).unwrapped  # fmt: skip
    ids = np.arange(5, 25)[None]  # 20 tokens: not the pool's context
    _, info = env.reset(seed=0, options={"input_ids": ids})
    assert info["prompt"] == -1 and env.prompt_ids.tolist() == ids.tolist() and env.prefills == 0  # not kept
    terminated = False
    while not terminated:
        _, _, terminated, _, _ = env.step(int(np.flatnonzero(env.action_masks()).max()))
    record = env.episode_record()
    assert record["input_ids"] == ids[0].tolist()
    assert replay(record).matches
    for bad in ([[1]], np.ones((2, 4), int), [[0.5, 1.5]], [[-1, 3]]):
        with pytest.raises(ValueError, match="reset option input_ids"):
            env.reset(options={"input_ids": bad})
    with pytest.raises(ValueError, match="exclude each other"):
        env.reset(options={"input_ids": ids, "prompt": 0})


@pytest.mark.expensive
def test_an_agent_generates_in_an_env_with_its_own_observation_options(tiny_layered_model_dir, tmp_path, capsys):
    """An agent trained with the static prior needs no --static-prior: the command reads it from the agent."""
    from sb3_contrib import MaskablePPO

    from agents.agent_file import save_agent
    from agents.generate import main

    env = gym.make(KVCACHE_ENV_ID, model=tiny_layered_model_dir, context=48, prompts=1, observe_tokens=8, horizon=8,
                   ranks=(4, 8, 12, 16), recent_tokens=4, cache_budget=0.6, static_prior=True)  # fmt: skip
    path = save_agent(MaskablePPO("MlpPolicy", env, seed=0), tmp_path / "prior.safetensors")
    argv = ["--env", KVCACHE_ENV_ID, "--model", tiny_layered_model_dir, *TINY, "--context", "48", "--prompts", "1"]
    assert main([*argv, "--policy", str(path), "--no-compare"]) == 0
    out = capsys.readouterr().out
    assert "48 tokens, 8 observed" in out and len(out.split("ranks per layer:")[1].splitlines()[0].split()) == 2
