"""The policy zoo: any rank policy from its spec, a baseline (``fixed:32``, ``hindsight``) or a saved agent file.

Every command that takes a policy (``agents.evaluate --policies``, ``agents.record --policy``,
``train_agent.py --compare``) builds it here.
"""

from __future__ import annotations

import os
from typing import Any

from agents.agent_file import load_model_policy
from agents.rllib_agent import RLlibPolicy, is_rllib_agent
from oracle.baselines import BASELINES, check_baseline, make_baseline
from oracle.policy import RankPolicy


def make_policy(spec: str, env_kwargs: dict[str, Any], trust_pickle: bool = False) -> RankPolicy:
    """A policy from a spec: an agent file (``PATH.safetensors``), a baseline (``fixed:32``), or an SB3 zip.

    An SB3 zip (``[ALGO:]PATH.zip``) is a pickle and loads only with ``trust_pickle``. An agent file
    of an RLlib module (``python -m agents.rllib``) becomes an :class:`agents.rllib_agent.RLlibPolicy`, as does
    an RLlib checkpoint folder (``RUN/checkpoints/step_N``, with ``trust_pickle``: RLlib's checkpoints pickle).
    """
    if os.path.isfile(spec) and is_rllib_agent(spec):
        return RLlibPolicy.from_file(spec)
    if os.path.isfile(os.path.join(spec, "rllib_checkpoint.json")):
        return RLlibPolicy.from_checkpoint(spec, trust_pickle)
    if spec.endswith((".zip", ".safetensors")) or os.path.isfile(spec):
        return load_model_policy(spec, trust_pickle)
    return make_baseline(spec, env_kwargs)


def check_policy_spec(spec: str, option: str) -> None:
    """Refuse, before any long work, a spec that :func:`make_policy` cannot build.

    That is a missing agent file, an unknown baseline name or a bad baseline parameter (``fixed:abc``,
    ``static:match`` outside ``agents.evaluate``). ``option`` names the command's option, for the message.
    """
    if os.path.exists(spec):
        return
    if spec.endswith((".zip", ".safetensors")):
        raise ValueError(f"{option} {spec}: no such agent file")
    if spec.partition(":")[0] not in BASELINES:
        raise ValueError(
            f"{option} {spec!r}: neither an existing agent file nor a baseline; expected an agent file "
            f"(PATH.safetensors) or one of {BASELINES} as NAME or NAME:PARAM (e.g. fixed:32)"
        )
    try:
        check_baseline(spec)
    except ValueError as error:
        raise ValueError(f"{option}: {error}") from error
