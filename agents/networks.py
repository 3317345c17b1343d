"""Policy networks for SB3 algorithms on DRRL-Attention-v0: an MLP, and the paper's Transformer (Eq. 7).

The Transformer policy attends over the recent states of the episode. The history reaches it
through :class:`StateHistory`, an observation wrapper that turns the env's ``(D,)`` state into a
window ``(W, D + 1)`` of the last ``W`` states, oldest first, with a last column that is 1 for a
real state and 0 for the zero padding before the episode's first step. :class:`TransformerExtractor`
(an SB3 features extractor) embeds each state, adds a learned position embedding, runs a
Transformer encoder with the padding masked out, and returns the encoding of the current (last)
state; SB3's policy then applies its MLP (``net_arch``) and the softmax over ranks (Eq. 7), with
sb3-contrib's masking for MaskablePPO. Use :func:`policy_setup` to get both pieces by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import torch
from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from drrl_env.wrappers import DEFAULT_HISTORY, RankOffsets, StateHistory

NETWORKS = ("mlp", "transformer")
"""the policy networks by name (``--network``)"""


class TransformerExtractor(BaseFeaturesExtractor):
    """Transformer encoder over a window of states (Eq. 7's state encoder), as an SB3 features extractor.

    Takes ``(batch, W, D + 1)`` windows from :class:`StateHistory` (or plain ``(batch, D)`` states,
    a window of one) and returns ``(batch, d_model)``: the encoding of the current state.
    """

    def __init__(
        self,
        observation_space: spaces.Box,
        d_model: int = 64,
        num_heads: int = 4,
        num_layers: int = 2,
        dim_feedforward: int = 128,
    ) -> None:
        super().__init__(observation_space, features_dim=d_model)
        shape = observation_space.shape
        self.windowed = len(shape) == 2
        window, width = shape if self.windowed else (1, shape[0])
        self.embed = nn.Linear(width, d_model)
        self.position = nn.Parameter(torch.zeros(window, d_model))
        layer = nn.TransformerEncoderLayer(d_model, num_heads, dim_feedforward, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        windows = observations if self.windowed else observations.unsqueeze(1)  # (batch, W, width)
        padding = windows[..., -1] < 0.5 if self.windowed else torch.zeros(windows.shape[:2], dtype=torch.bool)
        padding = padding.to(windows.device)
        encoded = self.encoder(self.embed(windows) + self.position, src_key_padding_mask=padding)  # (batch, W, d)
        return self.norm(encoded[:, -1])  # the current state's encoding


@dataclass(frozen=True)
class PolicySetup:
    """What a named policy needs: SB3 ``policy_kwargs``, the history window (0: no wrapper), residual offsets.

    A residual policy has ``offsets`` and the ``reference_ranks`` they offset (``RankOffsets``).
    """

    name: str
    policy_kwargs: dict[str, Any]
    history: int
    offsets: tuple[int, ...] | None = None
    reference_ranks: tuple[int, ...] | None = None

    def wrap(self, env: gym.Env) -> gym.Env:
        """Wrap ``env`` as this policy expects: ``RankOffsets`` (residual), then :class:`StateHistory` (Transformer)."""
        if self.offsets is not None:
            env = RankOffsets(env, self.offsets, self.reference_ranks)
        return StateHistory(env, self.history) if self.history else env


def policy_setup(
    name: str,
    history: int = DEFAULT_HISTORY,
    offsets: tuple[int, ...] | None = None,
    reference_ranks: tuple[int, ...] | None = None,
) -> PolicySetup:
    """The ``policy_kwargs`` and env wrapping of a policy by name: ``mlp`` or ``transformer``.

    With ``offsets``, the policy is residual to ``reference_ranks`` (one candidate rank per layer).
    """
    if (offsets is None) != (reference_ranks is None):
        raise ValueError("a residual policy needs both offsets and reference_ranks")
    residual = {
        "offsets": None if offsets is None else tuple(int(o) for o in offsets),
        "reference_ranks": None if reference_ranks is None else tuple(int(r) for r in reference_ranks),
    }
    if name == "mlp":
        return PolicySetup(name, {"net_arch": [64, 64]}, 0, **residual)
    if name == "transformer":
        if history < 1:
            raise ValueError(f"history must be >= 1 for the transformer policy, got {history}")
        kwargs = {"features_extractor_class": TransformerExtractor, "net_arch": [64]}
        return PolicySetup(name, kwargs, history, **residual)
    raise ValueError(f"network must be one of {NETWORKS}, got {name!r}")


def setup_of_observation_space(space: spaces.Space) -> PolicySetup:
    """The setup a saved model was trained with, read off its observation space (a window means Transformer)."""
    if isinstance(space, spaces.Box) and len(space.shape) == 2:
        return policy_setup("transformer", space.shape[0])
    return policy_setup("mlp")
