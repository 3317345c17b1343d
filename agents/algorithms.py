"""RL algorithms by name: one registry entry per SB3-compatible algorithm.

``maskable_ppo`` (sb3-contrib, the default) uses the env's ``action_masks()``. The others do not
see the mask: a masked rank they pick is executed as the nearest allowed one, with
``info["masked_violation"]`` set and ``violation_penalty`` subtracted (see the env's docs), and
their violation rate is reported by training and evaluation. To add an algorithm, add one
:class:`Algorithm` to ``ALGORITHMS``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
from sb3_contrib import QRDQN, TRPO, MaskablePPO, RecurrentPPO
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.policies import BasePolicy

from agents.networks import PolicySetup
from drrl_env.env import DRRLAttentionEnv
from drrl_env.wrappers import RankOffsets


@dataclass(frozen=True)
class Algorithm:
    """An SB3-compatible algorithm as train_agent.py uses it."""

    name: str
    cls: type[BaseAlgorithm]
    masked: bool = False
    """uses the env's action masks"""
    recurrent: bool = False
    """an LSTM policy: predict() carries a hidden state through the episode"""
    policy: str = "MlpPolicy"
    on_policy: bool = True
    """rollout length is n_steps (on-policy) rather than a replay buffer"""
    defaults: dict[str, Any] = field(default_factory=dict)

    def make(
        self, env: gym.Env | Any, setup: PolicySetup, seed: int, logdir: str | None, **kwargs: Any
    ) -> BaseAlgorithm:
        """A new model on ``env`` with the policy network of ``setup``; ``kwargs`` override the defaults."""
        arguments = {**self.defaults, **kwargs}
        if not self.on_policy:
            arguments.pop("n_steps", None)
        policy_kwargs = dict(setup.policy_kwargs)
        if self.recurrent and "features_extractor_class" in policy_kwargs:
            raise ValueError("recurrent_ppo carries its own memory (an LSTM): use --network mlp with it")
        return self.cls(
            self.policy, env, policy_kwargs=policy_kwargs, seed=seed, tensorboard_log=logdir, device="cpu", **arguments
        )


ALGORITHMS: dict[str, Algorithm] = {
    algorithm.name: algorithm
    for algorithm in (
        Algorithm("maskable_ppo", MaskablePPO, masked=True),
        Algorithm("ppo", PPO),
        Algorithm("a2c", A2C),
        Algorithm("trpo", TRPO),
        Algorithm("recurrent_ppo", RecurrentPPO, recurrent=True, policy="MlpLstmPolicy"),
        Algorithm("dqn", DQN, on_policy=False, defaults={"learning_starts": 100, "buffer_size": 50_000}),
        Algorithm("qrdqn", QRDQN, on_policy=False, defaults={"learning_starts": 100, "buffer_size": 50_000}),
    )
}


def get_algorithm(name: str) -> Algorithm:
    """The registry entry ``name``; the error lists the registered names."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; registered: {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


class ModelPolicy:
    """A trained SB3 policy network as a :class:`~oracle.policy.RankPolicy` (deterministic actions).

    MaskablePPO gets the action mask; other algorithms act without it (the env then executes the
    nearest allowed rank, a violation). Recurrent policies carry their LSTM state through the
    episode. ``wrap`` is the observation wrapping the model was trained with (the Transformer's
    state window), applied to the env's observations here; a residual policy's offsets
    (``setup.offsets``) are translated to the env's ranks by a ``RankOffsets`` around the env.
    """

    def __init__(self, policy: BasePolicy, algorithm: Algorithm, setup: PolicySetup, name: str) -> None:
        self.policy, self.algorithm, self.setup, self.name = policy, algorithm, setup, name
        self._states: list[np.ndarray] = []
        self._lstm: Any = None
        self._translator: RankOffsets | None = None

    @property
    def flops_per_decision(self) -> float:
        """Estimated FLOPs of one action: 2 per weight of the actor path (features, policy MLP, action head).

        A Transformer extractor runs every state of its window, so its weights count once per
        window position. Biases, norms and activations are left out (an estimate, not a count).
        """

        def weights(module: Any) -> int:
            return 0 if module is None else sum(p.numel() for p in module.parameters() if p.dim() > 1)

        policy = self.policy
        value_net = getattr(policy, "q_net", None) or getattr(policy, "quantile_net", None)
        if value_net is not None:  # dqn, qrdqn: the Q (quantile) network, with its own features extractor
            return 2.0 * weights(value_net)
        extractor = getattr(policy, "pi_features_extractor", None) or getattr(policy, "features_extractor", None)
        mlp = getattr(policy, "mlp_extractor", None)
        heads = [getattr(mlp, "policy_net", None), getattr(policy, "action_net", None)]
        heads.append(getattr(policy, "lstm_actor", None))
        return 2.0 * (weights(extractor) * max(self.setup.history, 1) + sum(weights(head) for head in heads))

    def reset(self, seed: int) -> None:
        del seed
        self._states, self._lstm = [], None

    def _residual(self, env: DRRLAttentionEnv) -> RankOffsets:
        """The ``RankOffsets`` translator of a residual policy around ``env`` (one per env)."""
        if self._translator is None or self._translator.unwrapped is not env:
            self._translator = RankOffsets(env, self.setup.offsets, self.setup.reference_ranks)
        return self._translator

    def act(self, observation: np.ndarray, action_mask: np.ndarray, env: DRRLAttentionEnv) -> int | np.ndarray:
        if self.setup.offsets is not None:  # a residual policy: offsets from its reference allocation
            translator = self._residual(env)
            return translator.action(self._act(translator.observation(observation), translator.action_masks()))
        return self._act(observation, action_mask)

    def _act(self, observation: np.ndarray, action_mask: np.ndarray) -> int | np.ndarray:
        from drrl_env.wrappers import stack_states

        self._states.append(np.asarray(observation, dtype=np.float32))
        obs = stack_states(self._states, self.setup.history) if self.setup.history else self._states[-1]
        if self.algorithm.masked:
            action, _ = self.policy.predict(obs, action_masks=action_mask, deterministic=True)
        elif self.algorithm.recurrent:
            start = np.array([self._lstm is None])
            action, self._lstm = self.policy.predict(obs, state=self._lstm, episode_start=start, deterministic=True)
        else:
            action, _ = self.policy.predict(obs, deterministic=True)
        action = np.asarray(action)
        return int(action.reshape(())) if action.size == 1 else action  # MultiDiscrete with per_head
