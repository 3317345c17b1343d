"""Agent files: a trained policy as safetensors weights plus a JSON description, loaded without unpickling.

An agent file ``NAME.safetensors`` holds the policy network's ``state_dict`` as tensors, and in
the safetensors header's metadata one JSON entry, ``drrl_agent``::

    {"format": "drrl-agent", "version": 1, "algo": "maskable_ppo", "policy": "mlp", "history": 0,
     "observation_space": {"type": "Box", ...}, "action_space": {"type": "Discrete", "n": 8},
     "num_timesteps": 15000}

Reading one parses the header and copies tensors; nothing in the file is executed (this is
what safetensors is for). The policy is rebuilt from the algorithm registry
(:data:`agents.algorithms.ALGORITHMS`), the named network (:func:`agents.networks.policy_setup`)
and the two spaces, and the weights are loaded strictly, so a file whose tensors do not fit the
described network is refused. A plain SB3 ``.zip`` is a cloudpickle: loading one can run any code
its author put in it, so :func:`load_sb3_zip` needs ``trust_pickle=True``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.policies import BasePolicy

from agents.algorithms import ALGORITHMS, Algorithm, ModelPolicy, get_algorithm
from agents.networks import PolicySetup, policy_setup, setup_of_observation_space
from drrl_env.lm.files import write_atomic

FORMAT = "drrl-agent"
VERSION = 1
METADATA_KEY = "drrl_agent"
SUFFIX = ".safetensors"
PICKLE_WARNING = (
    "warning: loading {path} with pickle (--trust-pickle): a crafted SB3 .zip runs arbitrary code when loaded; "
    "load only files you made or trust"
)


class AgentFileError(ValueError):
    """A file is not a readable drrl agent file, or does not fit the network it describes."""


def space_to_json(space: spaces.Space) -> dict[str, Any]:
    """A Box, Discrete or MultiDiscrete space as plain JSON values."""
    if isinstance(space, spaces.Box):
        return {"type": "Box", "low": space.low.tolist(), "high": space.high.tolist(), "dtype": str(space.dtype)}
    if isinstance(space, spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": space.nvec.tolist()}
    raise TypeError(f"agent files store Box, Discrete and MultiDiscrete spaces, not {space}")


def space_from_json(description: dict[str, Any]) -> spaces.Space:
    """The inverse of :func:`space_to_json`."""
    kind = description.get("type")
    if kind == "Box":
        dtype = np.dtype(description["dtype"])
        return spaces.Box(np.asarray(description["low"], dtype), np.asarray(description["high"], dtype), dtype=dtype)
    if kind == "Discrete":
        return spaces.Discrete(int(description["n"]), start=int(description.get("start", 0)))
    if kind == "MultiDiscrete":
        return spaces.MultiDiscrete(np.asarray(description["nvec"], dtype=np.int64))
    raise ValueError(f"unknown space type {kind!r}")


@dataclass(frozen=True)
class AgentDescription:
    """What rebuilds an agent's policy network: the algorithm, the named network, the spaces."""

    algo: str
    policy: str
    """the policy network's name (agents.networks.NETWORKS)"""
    history: int
    observation_space: dict[str, Any]
    action_space: dict[str, Any]
    num_timesteps: int
    format: str = FORMAT
    version: int = VERSION
    offsets: list[int] | None = None
    """a residual policy's rank offsets (drrl_env.wrappers.RankOffsets), None for an absolute one"""
    reference_ranks: list[int] | None = None
    """the allocation a residual policy offsets, one candidate rank per layer"""

    @property
    def algorithm(self) -> Algorithm:
        return get_algorithm(self.algo)

    @property
    def setup(self) -> PolicySetup:
        return policy_setup(self.policy, self.history, self.offsets, self.reference_ranks)

    def spaces(self) -> tuple[spaces.Space, spaces.Space]:
        return space_from_json(self.observation_space), space_from_json(self.action_space)


def algorithm_of(model: BaseAlgorithm) -> Algorithm:
    """The registry entry whose class ``model`` is."""
    for algorithm in ALGORITHMS.values():
        if type(model) is algorithm.cls:
            return algorithm
    raise ValueError(f"{type(model).__name__} is not a registered algorithm ({sorted(ALGORITHMS)})")


def describe(model: BaseAlgorithm, residual: PolicySetup | None = None) -> AgentDescription:
    """The description of ``model`` that :func:`save_agent` writes (``residual``: its residual setup, if any)."""
    setup = setup_of_observation_space(model.observation_space)
    offsets = None if residual is None or residual.offsets is None else list(residual.offsets)
    reference = None if offsets is None else list(residual.reference_ranks)
    return AgentDescription(
        algo=algorithm_of(model).name,
        policy=setup.name,
        history=setup.history,
        observation_space=space_to_json(model.observation_space),
        action_space=space_to_json(model.action_space),
        num_timesteps=int(model.num_timesteps),
        offsets=offsets,
        reference_ranks=reference,
    )


def agent_path(path: str | os.PathLike) -> Path:
    """``path`` with the ``.safetensors`` suffix added if it has another one or none."""
    path = Path(path)
    return path if path.suffix == SUFFIX else path.with_name(path.name + SUFFIX)


def save_agent(model: BaseAlgorithm, path: str | os.PathLike, residual: PolicySetup | None = None) -> Path:
    """Write ``model``'s policy as an agent file, atomically; returns the path (``.safetensors`` added).

    ``residual``: the setup of a residual policy (its offsets and reference allocation are stored).
    """
    metadata = {METADATA_KEY: json.dumps(asdict(describe(model, residual)))}
    path = agent_path(path)
    return write_atomic(path, lambda temporary: safetensors.torch.save_model(model.policy, temporary, metadata))


def read_description(path: str | os.PathLike) -> AgentDescription:
    """The description in an agent file's header; :class:`AgentFileError` names the file if it has none."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"agent file {str(path)!r} does not exist")
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for any malformed header
        raise AgentFileError(f"{path} is not a readable safetensors file ({error}); it may be truncated") from error
    if METADATA_KEY not in metadata:
        raise AgentFileError(f"{path} is a safetensors file but not a drrl agent (no {METADATA_KEY!r} metadata)")
    try:
        fields = json.loads(metadata[METADATA_KEY])
        description = AgentDescription(**fields)
    except (TypeError, ValueError) as error:
        raise AgentFileError(f"{path}: its {METADATA_KEY!r} metadata is not a valid description ({error})") from error
    if description.format != FORMAT or description.version != VERSION:
        raise AgentFileError(
            f"{path}: agent format {description.format!r} version {description.version}; "
            f"this drrl reads {FORMAT!r} version {VERSION}"
        )
    return description


def load_weights(policy: BasePolicy, path: str | os.PathLike) -> None:
    """Copy an agent file's tensors into ``policy`` (strict: every tensor and only those, same shapes)."""
    try:
        safetensors.torch.load_model(policy, str(path), strict=True, device="cpu")
    except RuntimeError as error:
        raise AgentFileError(f"{path}: its weights do not fit the network it describes ({error})") from error


def check_fits(description: AgentDescription, model: BaseAlgorithm, path: str | os.PathLike) -> None:
    """Refuse to load ``path`` into ``model`` if the algorithm, network or spaces differ."""
    observation_space, action_space = description.spaces()
    mine = algorithm_of(model).name, setup_of_observation_space(model.observation_space).name
    differing = [
        f"{what}: file {theirs}, here {ours}"
        for what, theirs, ours in (
            ("algorithm", description.algo, mine[0]),
            ("policy network", description.policy, mine[1]),
            ("observation space", observation_space, model.observation_space),
            ("action space", action_space, model.action_space),
        )
        if theirs != ours
    ]
    if differing:
        raise AgentFileError(f"{path} does not fit this run ({'; '.join(differing)})")


def load_agent_into(model: BaseAlgorithm, path: str | os.PathLike) -> AgentDescription:
    """Load an agent file's policy weights into a freshly built ``model`` of the same setup."""
    description = read_description(path)
    check_fits(description, model, path)
    load_weights(model.policy, path)
    return description


def check_header_against_tensors(description: AgentDescription, path: str | os.PathLike) -> None:
    """Refuse a header whose action space the file's own action head does not have, before building anything.

    A crafted header (``action_space.n = 2_000_000``) would otherwise make the loader build a network of that
    size first; the tensor shapes are read from the file's header, without loading them.
    """
    _, action_space = description.spaces()
    logits = int(action_space.n) if isinstance(action_space, spaces.Discrete) else int(np.sum(action_space.nvec))
    with safetensors.safe_open(str(path), framework="pt") as handle:
        shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}  # noqa: SIM118
    head = [shape[0] for name, shape in shapes.items() if name.endswith("action_net.weight")]  # actor-critics
    if head and head[0] != logits:
        raise AgentFileError(f"{path}: its header declares {logits} action logits, its action head has {head[0]}")


def load_policy(path: str | os.PathLike) -> tuple[BasePolicy, AgentDescription]:
    """Rebuild the policy network an agent file describes and load its weights (inference mode, CPU)."""
    description = read_description(path)
    check_header_against_tensors(description, path)
    algorithm = description.algorithm
    observation_space, action_space = description.spaces()
    policy_class = algorithm.cls.policy_aliases[algorithm.policy]
    policy = policy_class(observation_space, action_space, lambda _: 0.0, **description.setup.policy_kwargs)
    load_weights(policy, path)
    policy.set_training_mode(False)
    return policy, description


def load_sb3_zip(path: str | os.PathLike, algorithm: Algorithm, trust_pickle: bool, **kwargs: Any) -> BaseAlgorithm:
    """``algorithm.cls.load(path)``: only with ``trust_pickle`` (it unpickles), and then with a warning."""
    if not trust_pickle:
        raise AgentFileError(
            f"{path} is an SB3 .zip, which is a pickle and can run code when loaded; pass --trust-pickle "
            "(trust_pickle=True) only if you trust it, or use an agent .safetensors file"
        )
    print(PICKLE_WARNING.format(path=path), file=sys.stderr)
    return algorithm.cls.load(path, device="cpu", **kwargs)


def short_id(path: str | os.PathLike) -> str:
    """A saved agent's name in tables, legends and TensorBoard keys: its file stem, or its run's folder name.

    ``runs/RUN/model.safetensors`` is ``RUN`` (every run's final agent has the same file name),
    ``runs/bc.safetensors`` is ``bc``.
    """
    path = Path(path)
    return path.parent.name if path.stem == "model" and path.parent.name else path.stem


def load_model_policy(spec: str, trust_pickle: bool = False) -> ModelPolicy:
    """A saved agent as a rank policy: ``PATH.safetensors``, or an SB3 zip ``[ALGO:]PATH.zip`` with ``trust_pickle``.

    ``ALGO:`` names the algorithm of a zip (default maskable_ppo); an agent file says its own.
    """
    algo_name, _, path = spec.rpartition(":") if ":" in spec and not os.path.isfile(spec) else ("", "", spec)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file {path!r} does not exist (policy spec {spec!r})")
    if path.endswith(".zip"):
        algorithm = get_algorithm(algo_name or "maskable_ppo")
        model = load_sb3_zip(path, algorithm, trust_pickle)
        setup = setup_of_observation_space(model.observation_space)
        return ModelPolicy(model.policy, algorithm, setup, f"{algorithm.name}:{short_id(path)}")
    policy, description = load_policy(path)
    if algo_name and algo_name != description.algo:
        raise AgentFileError(f"{path} holds a {description.algo} agent, not {algo_name} (policy spec {spec!r})")
    return ModelPolicy(policy, description.algorithm, description.setup, f"{description.algo}:{short_id(path)}")
