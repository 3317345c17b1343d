"""RLlib agents: the action-masking module, saved as an agent file and run as a rank policy of the zoo.

The module is RLlib's own action-masking PPO module
(``ray.rllib.examples.rl_modules.classes.action_masking_rlm.ActionMaskingTorchRLModule``) over
the observations of :class:`drrl_env.wrappers.MaskInObservation`: it adds ``log(mask)`` to the
action logits, so a masked action is never sampled. A trained module is saved like an SB3 agent
(:mod:`agents.agent_file`): its ``state_dict`` as safetensors, with one JSON entry
``drrl_rllib_agent`` in the header (the spaces, the network's ``model_config``, the steps
trained), so loading it unpickles nothing; it is rebuilt from that description and its weights
are loaded strictly. ``python -m agents.evaluate --policies runs/RUN/model.safetensors`` and
``train_agent.py --compare`` take it like any agent file (:func:`agents.zoo.make_policy`); an
RLlib checkpoint folder (``RUN/checkpoints/step_N``) loads too, with ``--trust-pickle``.
Ray is an optional extra: everything here but :func:`is_rllib_agent` needs it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from gymnasium import spaces

from agents.agent_file import AgentFileError, read_description, short_id, space_from_json, space_to_json
from drrl_env.env import DRRLAttentionEnv
from drrl_env.lm.files import write_atomic
from drrl_env.wrappers import mask_observation_space

INSTALL_HINT = "pip install 'drrl[rllib]' (from a clone: pip install -e '.[rllib]')"
FORMAT = "drrl-rllib-agent"
VERSION = 1
METADATA_KEY = "drrl_rllib_agent"
CHECKPOINT_MODULE = ("learner_group", "learner", "rl_module", "default_policy")
"""where an RLlib algorithm checkpoint keeps the trained module"""
MODEL_CONFIG: dict[str, Any] = {"fcnet_hiddens": [64, 64], "fcnet_activation": "tanh", "vf_share_layers": False}
"""the policy and value networks: SB3's MlpPolicy (two separate 64-64 tanh MLPs), so both backends train the same
network"""


SB3_TO_RLLIB = {
    "mlp_extractor.policy_net.": "encoder.actor_encoder.net.mlp.",
    "mlp_extractor.value_net.": "encoder.critic_encoder.net.mlp.",
    "action_net.": "pi.net.mlp.0.",
    "value_net.": "vf.net.mlp.0.",
}
"""SB3's MlpPolicy tensor names (prefixes) and the RLlib module's for the same layers (MODEL_CONFIG is that network)"""


def require_rllib() -> None:
    """Raise ``ImportError`` with the install command when Ray RLlib (the ``drrl[rllib]`` extra) is missing."""
    try:
        import ray.rllib  # noqa: F401
    except ImportError as error:
        raise ImportError(f"the RLlib backend needs Ray RLlib, an optional extra: {INSTALL_HINT}") from error


def build_module(observation_space: spaces.Space, action_space: spaces.Space, model_config: dict[str, Any]) -> Any:
    """A new action-masking PPO module over the env's observation space (without the mask) and action space."""
    require_rllib()
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
    from ray.rllib.examples.rl_modules.classes.action_masking_rlm import ActionMaskingTorchRLModule

    return ActionMaskingTorchRLModule(
        observation_space=mask_observation_space(observation_space, action_space),
        action_space=action_space,
        model_config=DefaultModelConfig(**model_config),
    )


def save_rllib_agent(module: Any, path: str | os.PathLike, model_config: dict[str, Any], num_timesteps: int) -> Path:
    """Write ``module`` (an action-masking module) as an agent file, atomically; returns the path."""
    description = {
        "format": FORMAT,
        "version": VERSION,
        "algo": "rllib_ppo",
        "observation_space": space_to_json(module.observation_space["observations"]),
        "action_space": space_to_json(module.action_space),
        "model_config": model_config,
        "num_timesteps": int(num_timesteps),
    }
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in module.state_dict().items()}
    metadata = {METADATA_KEY: json.dumps(description)}
    return write_atomic(path, lambda temporary: safetensors.torch.save_file(tensors, temporary, metadata=metadata))


def _metadata(path: str | os.PathLike) -> dict[str, str]:
    with safetensors.safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def is_rllib_agent(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an agent file of an RLlib module (reads the header only; needs no Ray)."""
    try:
        return METADATA_KEY in _metadata(path)
    except (OSError, safetensors.SafetensorError):
        return False


def load_rllib_module(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """Rebuild the module an RLlib agent file describes and load its weights strictly; (module, description)."""
    try:
        description = json.loads(_metadata(path)[METADATA_KEY])
    except (OSError, KeyError, ValueError, safetensors.SafetensorError) as error:
        raise AgentFileError(f"{path} is not a readable RLlib agent file: {error}") from None
    if description.get("format") != FORMAT or description.get("version") != VERSION:
        raise AgentFileError(
            f"{path}: unknown RLlib agent format {description.get('format')!r} v{description.get('version')}"
        )
    module = build_module(
        space_from_json(description["observation_space"]),
        space_from_json(description["action_space"]),
        description["model_config"],
    )
    try:
        module.load_state_dict(safetensors.torch.load_file(str(path)), strict=True)
    except RuntimeError as error:
        raise AgentFileError(f"{path}: its tensors do not fit the network it describes: {error}") from None
    module.eval()
    return module, description


def sb3_weights_as_rllib(path: str | os.PathLike, module: Any) -> dict[str, torch.Tensor]:
    """The full ``state_dict`` of ``module`` with the layers of an SB3 maskable_ppo MLP agent file in place.

    The two networks are the same (:data:`MODEL_CONFIG`), so a behaviour-cloned agent
    (``python -m agents.bc``, ``RUN/bc_model.safetensors``) warm-starts RLlib's PPO as it does SB3's.
    Refused (``AgentFileError``) for other algorithms or policies, or tensors that do not fit.
    """
    description = read_description(path)
    if description.algo != "maskable_ppo" or description.policy != "mlp" or description.history:
        raise AgentFileError(
            f"{path}: a {description.algo} agent with the {description.policy!r} policy; RLlib starts only from a "
            "maskable_ppo agent with the 'mlp' policy (the same network)"
        )
    state = module.state_dict()
    for name, tensor in safetensors.torch.load_file(str(path)).items():
        prefix = next((p for p in SB3_TO_RLLIB if name.startswith(p)), None)
        target = None if prefix is None else SB3_TO_RLLIB[prefix] + name[len(prefix) :]
        if target not in state or state[target].shape != tensor.shape:
            raise AgentFileError(f"{path}: tensor {name} {tuple(tensor.shape)} has no place in the RLlib module")
        state[target] = tensor
    return state


def greedy_actions(module: Any, observations: np.ndarray, action_masks: np.ndarray) -> np.ndarray:
    """The most likely allowed action for each row of a batch: ``(N,)``, or ``(N, Hkv)`` for a MultiDiscrete space.

    ``observations`` is ``(N, obs_dim)``, ``action_masks`` ``(N, logits)`` (0/1, one per logit); the
    module adds ``log(mask)`` to its logits, so masked actions never win.
    """
    from ray.rllib.core.columns import Columns

    batch = {
        Columns.OBS: {
            "observations": torch.as_tensor(np.asarray(observations, np.float32)),
            "action_mask": torch.as_tensor(np.asarray(action_masks, np.float32)),
        }
    }
    with torch.no_grad():
        logits = module.forward_inference(batch)[Columns.ACTION_DIST_INPUTS]
    space = module.action_space
    if isinstance(space, spaces.MultiDiscrete):
        blocks = torch.split(logits, [int(n) for n in space.nvec], dim=-1)
        return torch.stack([block.argmax(-1) for block in blocks], dim=-1).numpy()
    return logits.argmax(-1).numpy()


class RLlibPolicy:
    """An action-masking RLlib module as a :class:`~oracle.policy.RankPolicy`: the most likely allowed action."""

    def __init__(self, module: Any, name: str) -> None:
        self.module, self.name = module, name

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> RLlibPolicy:
        """The policy of an RLlib agent file (see :func:`save_rllib_agent`)."""
        module, description = load_rllib_module(path)
        return cls(module, f"{description['algo']}:{short_id(path)}")

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, trust_pickle: bool = False) -> RLlibPolicy:
        """The policy of an RLlib algorithm checkpoint folder (``RUN/checkpoints/step_N``): RLlib's loader.

        RLlib's checkpoints pickle, so this needs ``trust_pickle``; the run's agent file does not.
        """
        module_dir = Path(path, *CHECKPOINT_MODULE)
        if not module_dir.is_dir():
            raise AgentFileError(f"{path} is not an RLlib algorithm checkpoint (no {'/'.join(CHECKPOINT_MODULE)})")
        if not trust_pickle:
            raise AgentFileError(
                f"{path} is an RLlib checkpoint, which pickles and can run code when loaded; pass --trust-pickle "
                "(trust_pickle=True) only if you trust it, or use the run's model.safetensors"
            )
        require_rllib()
        from ray.rllib.core.rl_module.rl_module import RLModule

        print(f"warning: loading {path} with pickle (--trust-pickle)", file=sys.stderr)
        module = RLModule.from_checkpoint(module_dir.resolve())
        module.eval()
        return cls(module, f"rllib_ppo:{Path(path).parent.parent.name}/{Path(path).name}")

    @property
    def flops_per_decision(self) -> float:
        """Estimated FLOPs of one action: 2 per weight of the actor path (the value network is left out)."""
        return 2.0 * sum(
            p.numel()
            for name, p in self.module.named_parameters()
            if p.dim() > 1 and "vf" not in name and "critic" not in name
        )

    def reset(self, seed: int) -> None:
        del seed

    def act(self, observation: np.ndarray, action_mask: np.ndarray, env: DRRLAttentionEnv) -> int | np.ndarray:
        del env
        action = greedy_actions(self.module, observation[None], np.asarray(action_mask, np.float32)[None])[0]
        return int(action) if np.ndim(action) == 0 else action
