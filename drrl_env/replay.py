"""Replay an episode record and check that it gives the same ranks and rewards.

A record is what ``env.unwrapped.episode_record()`` returns (JSON): the env configuration, the
episode seed (which draws the batch and the budget), the guardrail step (Eq. 11's ``t``), the
actions, and per step the executed rank, the reward and its terms; at the end the budget used,
the KL and the LM losses. :func:`replay` makes the env anew, resets it to the same episode,
takes the same actions and compares step by step, reporting the first step that diverges.

    python -m agents.replay RECORD.json [--atol 1e-9] [--device cpu]

Rewards are compared with an absolute tolerance (``atol``): on the same machine and device a
replay is exact; another BLAS or device may differ in the last bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import gymnasium as gym

from drrl_env.config import ENV_ID, VARIANTS
from drrl_env.kvcache import KVCACHE_ENV_ID

FINAL_KEYS = ("budget_used", "kl", "lm_loss", "lm_loss_full")


@dataclass(frozen=True)
class ReplayResult:
    """Whether a replay matched; where and how it diverged if not (``step`` is 0-based, None at the end)."""

    matches: bool
    steps: int
    step: int | None = None
    message: str = "the replay gives the same ranks and rewards"


def _close(a: Any, b: Any, atol: float) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)
    return math.isclose(float(a), float(b), rel_tol=0.0, abs_tol=atol)


def replay(record: dict[str, Any], atol: float = 1e-9, **overrides: Any) -> ReplayResult:
    """Re-run ``record``'s episode and compare; ``overrides`` change env arguments (e.g. ``device``)."""
    import drrl_env  # noqa: F401  (registers the env)

    for key in ("config", "episode_seed", "guardrail_step", "steps"):
        if key not in record:
            raise ValueError(f"not an episode record: the key {key!r} is missing")
    env_id = record.get("env_id", ENV_ID)
    ids = sorted([*VARIANTS, KVCACHE_ENV_ID])
    if env_id not in ids:  # gym.make imports the module an id names: a record may name only our ids
        raise ValueError(f"env_id {env_id!r} is not a registered id of drrl (expected one of {ids})")
    env = gym.make(env_id, **{**record["config"], **overrides}).unwrapped
    try:
        if env_id == KVCACHE_ENV_ID:  # the episode's prompt and budget, as it was reset
            own = record.get("input_ids")  # a prompt given as token ids (reset option input_ids), else the pool's
            options = {"input_ids": own} if own is not None else {"prompt": int(record["prompt"])}
            options |= {"budget": float(record["budget"])} if env.config.cache_budget is not None else {}
        else:
            options = {"episode_seed": int(record["episode_seed"]), "guardrail_step": int(record["guardrail_step"])}
        _, info = env.reset(options=options)
        if not _close(info["budget"], record.get("budget", info["budget"]), atol):
            return ReplayResult(False, 0, 0, f"budget: recorded {record['budget']}, replayed {info['budget']}")
        steps = record["steps"]
        expected = env.num_layers * env.num_segments
        if not isinstance(steps, list) or len(steps) != expected:
            got = len(steps) if isinstance(steps, list) else type(steps).__name__
            raise ValueError(f"the record holds {got} step(s); its episode has {expected}: it is cut or not a record")
        if "budget_used" not in record:
            raise ValueError("the record lacks its final 'budget_used': it is cut")
        for index, recorded in enumerate(steps):
            lacking = [key for key in ("action", "rank", "reward", "reward_terms") if key not in recorded]
            if lacking:
                raise ValueError(f"step {index} of the record lacks {lacking}")
            action = recorded["action"] if getattr(env.config, "per_head", False) else recorded["action"][0]
            _, reward, terminated, _, info = env.step(action)
            if info["rank"] != recorded["rank"]:
                return ReplayResult(
                    False, index + 1, index, f"step {index}: rank recorded {recorded['rank']}, replayed {info['rank']}"
                )
            for term, value in recorded["reward_terms"].items():
                replayed = info["reward_terms"].get(term, float("nan"))
                if not _close(value, replayed, atol):
                    return ReplayResult(
                        False,
                        index + 1,
                        index,
                        f"step {index}: reward term {term!r} recorded {value}, replayed {replayed}",
                    )
            if not _close(recorded["reward"], reward, atol):
                return ReplayResult(
                    False, index + 1, index, f"step {index}: reward recorded {recorded['reward']}, replayed {reward}"
                )
            if terminated and index + 1 < len(record["steps"]):
                return ReplayResult(False, index + 1, index, f"step {index}: the replayed episode ended early")
        for key in FINAL_KEYS:
            if key in record and not _close(record[key], info.get(key, float("nan")), atol):
                return ReplayResult(
                    False, len(record["steps"]), None, f"{key}: recorded {record[key]}, replayed {info.get(key)}"
                )
        return ReplayResult(True, len(record["steps"]))
    finally:
        env.close()
