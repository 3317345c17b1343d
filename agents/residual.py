"""Residual agents: a policy that chooses offsets from the static allocation, and starts at it (``--residual``).

The static allocation (:mod:`oracle.static`, the water-fill of a validation profile) is the
strongest fixed rule; a residual agent's action is an offset in candidate steps from its rank at
each layer (``drrl_env.wrappers.RankOffsets``), so a policy that learns nothing replays static, and
the reward ``log(KL_static / KL)`` on the episode's own batch (the env's ``reference_log_ratio``
baseline) scores only what the deviations gain or lose on this input (a paired comparison, free of
how hard the input is). The model starts with offset 0 more likely than the others
(:data:`ZERO_OFFSET_BIAS` on its logit), so training explores around static instead of from a
uniform distribution over offsets.
"""

from __future__ import annotations

from typing import Any

import torch
from stable_baselines3.common.base_class import BaseAlgorithm

from agents.networks import PolicySetup, policy_setup
from agents.train_config import TrainConfig
from agents.zoo import make_policy
from drrl_env.config import EnvConfig
from drrl_env.wrappers import DEFAULT_OFFSETS

ZERO_OFFSET_BIAS = 2.0
"""added to the initial logit of offset 0: with five offsets, it starts with probability 0.65"""


def residual_setup(train: TrainConfig, env_kwargs: dict[str, Any]) -> PolicySetup:
    """The policy setup of ``train``; with ``train.residual``, fill in the static allocation and the paired reward.

    Sets ``env_kwargs["reference_ranks"]`` (the static allocation of the budget, unless given) and
    ``env_kwargs["kl_baseline"]`` (``reference_log_ratio`` unless given), in place, so that the run's
    stored options hold them and ``--resume`` needs no new profile. ``ValueError`` for a budget range,
    no budget or per-head ranks.
    """
    if not train.residual:
        return policy_setup(train.network, train.history)
    config = EnvConfig(**env_kwargs)
    if config.flops_budget is None or config.flops_budget[0] != config.flops_budget[1] or config.per_head:
        raise ValueError("--residual needs one --flops-budget share and one rank per layer (no --per-head)")
    if env_kwargs.get("reference_ranks") is None:
        budget = config.flops_budget[0]
        static = make_policy(f"static:{budget:g}:fisher", env_kwargs)
        env_kwargs["reference_ranks"] = tuple(config.ranks[index] for index in static.allocation(budget))
        print(f"residual agent: static allocation {list(env_kwargs['reference_ranks'])}")
    if env_kwargs["kl_baseline"] == "none":
        env_kwargs["kl_baseline"] = "reference_log_ratio"
    return policy_setup(train.network, train.history, DEFAULT_OFFSETS, tuple(env_kwargs["reference_ranks"]))


def start_at_reference(model: BaseAlgorithm, setup: PolicySetup) -> None:
    """Make offset 0 the likeliest action of a new residual ``model`` (its action head's bias)."""
    with torch.no_grad():
        model.policy.action_net.bias[setup.offsets.index(0)] += ZERO_OFFSET_BIAS
