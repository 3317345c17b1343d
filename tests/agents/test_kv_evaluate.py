"""python -m agents.evaluate --env DRRL-KVCache-v0: the key-cache comparison as a command (tiny model)."""

import csv

import numpy as np
import pytest

from drrl_env.kvcache import KVCACHE_ENV_ID

TINY = ["--context", "48", "--prompts", "2", "--observe-tokens", "8", "--horizon", "8", "--ranks", "4", "8", "12",
        "16", "--recent-tokens", "4"]  # fmt: skip


@pytest.mark.expensive
def test_the_key_cache_comparison_command(tiny_layered_model_dir, tmp_path, capsys):
    from agents.evaluate import main

    argv = ["--env", KVCACHE_ENV_ID, "--model", tiny_layered_model_dir, *TINY, "--out", str(tmp_path / "out")]
    assert main([*argv, "--policies", "uniform", "static", "hindsight", "--budgets", "0.6", "0.75"]) == 0
    out = capsys.readouterr().out
    assert "2 wiki test prompts of 48 tokens, 8 observed, 8 scored" in out
    with open(tmp_path / "out" / "comparison.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["budget"], row["policy"]) for row in rows] == [
        (budget, policy) for budget in ("0.75", "0.6") for policy in ("uniform", "static", "hindsight")
    ]
    for row in rows:
        assert float(row["cache_used"]) <= float(row["budget"]) + 1e-12 and np.isfinite(float(row["kl"]))
        if row["policy"] == "hindsight":  # 1 by definition, or NaN where static is no worse than the ceiling
            headroom = float(row["headroom_captured"])
            assert headroom == 1.0 or np.isnan(headroom)
    assert (tmp_path / "out" / "table.md").read_text().startswith(f"{KVCACHE_ENV_ID}: 2 wiki test prompts")
    for bad, message in (
        (["--policies", "fixed:32"], "--policies 'fixed:32': expected an agent file or one of"),
        (["--budgets", "1.5"], "--budgets 1.5: expected a share of the key cache in (0, 1]"),
    ):
        assert main([*argv, *bad]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.expensive
def test_agents_of_either_static_prior_setting_compare_side_by_side(tiny_layered_model_dir, tmp_path, monkeypatch):
    """An agent trained with the static prior plays in an env with it, beside one without; prompts computed once."""
    import gymnasium as gym
    from sb3_contrib import MaskablePPO

    import drrl_env.kvcache as kvcache
    from agents.agent_file import save_agent
    from agents.kv_evaluate import kv_comparison, observation_options
    from agents.zoo import make_policy
    from oracle.kvcache import kv_policy

    kwargs = dict(model=tiny_layered_model_dir, context=48, prompts=2, observe_tokens=8, horizon=8,
                  ranks=(4, 8, 12, 16), recent_tokens=4, cache_budget=0.6)  # fmt: skip
    agents = {}
    for prior in (False, True):
        env = gym.make(KVCACHE_ENV_ID, **kwargs, static_prior=prior)
        path = save_agent(MaskablePPO("MlpPolicy", env, seed=0), tmp_path / f"prior-{prior}.safetensors")
        agents[prior] = make_policy(str(path), kwargs)
        agents[prior].name = f"prior {prior}"
        assert observation_options(agents[prior], 4) == {"static_prior": prior, "attention_kl": False}
    assert observation_options(kv_policy("static"), 4) is None
    computed = []
    original = kvcache.prompt_state
    monkeypatch.setattr(kvcache, "prompt_state", lambda *args: computed.append(1) or original(*args))
    rows = kv_comparison([kv_policy("uniform"), agents[True], agents[False]], kwargs, 2, [0.6], progress=False)
    assert [row.policy for row in rows] == ["uniform", "prior True", "prior False"]
    assert all(np.isfinite(row.kl) and row.cache_used <= 0.6 + 1e-12 for row in rows)
    assert len(computed) == 2  # each prompt once, for both envs
