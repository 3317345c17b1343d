"""The training commands' options as dataclasses: one ``--field-name`` option per field, its docstring the help."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.networks import DEFAULT_HISTORY
from drrl_env.cli import (
    ENV_IDS,
    add_dataclass_arguments,
    add_env_arguments,
    at_least,
    dataclass_from_options,
    env_id_of,
    env_kwargs,
    preparse,
)
from drrl_env.config import ENV_ID, PAPER_ENV_ID, PER_LAYER_ENV_ID
from drrl_env.kvcache import KVCACHE_ENV_ID

BEST_COMPARE = ("uniform", "static:fisher", "hindsight:fisher", "hindsight:scaled_delta")
"""what the main command compares its agent with: the fixed rules at the same budget and the per-input ceilings"""
KV_COMPARE = ("uniform", "static", "energy", "logit_error", "self_profile", "hindsight")
"""what an agent of DRRL-KVCache-v0 is compared with (oracle.kvcache): the fixed rules, the rule on its own
observation, its teacher and the ceiling"""
VEC_ENVS = ("auto", "batched", "sync", "subproc")


PPO_NEAR_CLONE = '{"learning_rate": 1e-5, "target_kl": 0.01}'
"""MaskablePPO's settings in the per-head recipe: small steps keep it near its clone, which plays its teacher's plan
(docs/findings.md, "Does RL beat its teacher?"); used only with --algo maskable_ppo"""


@dataclass(frozen=True)
class Preset:
    """A named training recipe: the env variant it trains in, and the options it sets (``--preset NAME``)."""

    env: str
    """registered env id (drrl_env.config.VARIANTS) whose settings the env options start from"""
    summary: str
    """one line for --help"""
    train: dict[str, Any] = field(default_factory=dict)
    """TrainConfig fields that differ from the default recipe"""
    env_options: dict[str, Any] = field(default_factory=dict)
    """EnvConfig fields that differ from the variant's"""
    compare: tuple[str, ...] = BEST_COMPARE
    """the policies the trained agent is compared with"""


PRESETS: dict[str, Preset] = {
    "per-head": Preset(
        ENV_ID,
        "the best agent the project knows (the default): per key/value head, shown the Eq. S signal, cloned from its "
        "hindsight teacher, then MaskablePPO at a small learning rate",
        {"hyperparams": PPO_NEAR_CLONE},
    ),
    "scratch": Preset(
        ENV_ID,
        "the same env, MaskablePPO from scratch with the paired reward log(KL_teacher / KL), 50 episodes per update",
        {
            "warm_start": "none",
            "total_timesteps": 9000,
            "n_steps": 1500,
            "hyperparams": '{"batch_size": 300, "n_epochs": 4}',
        },
        {"kl_baseline": "waterfill_log_ratio"},
        (*BEST_COMPARE, "random"),
    ),
    "per-layer": Preset(
        PER_LAYER_ENV_ID,
        "one rank per layer, no per-input signal, cloned from the Fisher hindsight teacher, then MaskablePPO",
        {"warm_start": "hindsight", "bc_epochs": 30, "total_timesteps": 4500, "hyperparams": None},
        compare=("uniform", "static:fisher", "hindsight:fisher", "fixed:32", "energy:0.9", "oracle"),
    ),
    "residual": Preset(
        PER_LAYER_ENV_ID,
        "per layer, offsets of -2..+2 candidates from the static allocation, rewarded by log(KL_static / KL)",
        {"residual": True, "warm_start": "none", "total_timesteps": 4500, "hyperparams": None},
        compare=("uniform", "static:fisher", "hindsight:fisher"),
    ),
    "kvcache": Preset(
        KVCACHE_ENV_ID,
        "DRRL-KVCache-v0: each layer's key-cache rank after 64 generated tokens, at 0.6-0.75 of the key cache, "
        "the static prior in the observation, cloned from the self-profile teacher, then MaskablePPO; compared at "
        "both budgets on test prompts",
        {
            "warm_start": "self_profile",
            "warm_start_episodes": 64,
            "bc_epochs": 200,
            "total_timesteps": 1920,
            "n_steps": 240,
            "hyperparams": PPO_NEAR_CLONE,
        },
        {"cache_budget": (0.6, 0.75), "cached_prompts": 16, "static_prior": True},
        KV_COMPARE,
    ),  # fmt: skip
    "paper": Preset(
        PAPER_ENV_ID,
        "the paper's MDP (separate Q/K truncation, per-step Eq. 13 reward, Eq. 9 guardrail, no budget), from scratch",
        {"warm_start": "none", "total_timesteps": 4500, "hyperparams": None},
        compare=("fixed:32", "energy:0.9", "oracle"),
    ),
}
"""every recipe of train_agent.py by name; docs/training.md says what each measured"""
DEFAULT_PRESET = "per-head"
KV_PRESET = "kvcache"
"""the recipe ``--env DRRL-KVCache-v0`` starts from when no --preset is given"""


@dataclass
class TrainConfig:
    """How train_agent.py trains (the env's options come from ``EnvConfig``)."""

    preset: str = DEFAULT_PRESET
    """named recipe (agents.train_config.PRESETS): per-head (the default), scratch, per-layer, residual, paper,
    kvcache (DRRL-KVCache-v0, the default with --env DRRL-KVCache-v0); it sets the env and the defaults of the
    options below, which still override it"""
    algo: str = "maskable_ppo"
    """RL algorithm, a name of the registry agents.algorithms.ALGORITHMS"""
    total_timesteps: int = 1500
    """env steps of training (with --resume: the total, steps already done included)"""
    seed: int = 0
    """seed of the agent and of the episodes"""
    n_envs: int = 1
    """parallel envs"""
    vec: str = "auto"
    """vector env: 'batched' (the env's native vector env, drrl_env.vector: the n_envs episodes through one batched
    forward pass; the mlp network, not residual), 'sync' (in-process, one forward pass per env), 'subproc' (one
    process per env), or 'auto': batched where it applies and n_envs > 1, else sync. All give the same episodes"""
    n_steps: int = 150
    """rollout length per env and update for on-policy algorithms; it must be a multiple of the episode length
    (layers x segments), so that checkpoints fall at episode boundaries, which --resume needs. 150 is 5 episodes
    of 30 layers per update; more episodes per update give PPO steadier advantages (docs/findings.md,
    "Does RL beat its teacher?")"""
    hyperparams: str | None = None
    """keyword arguments of the algorithm's constructor as a JSON object, SB3's names, e.g.
    '{"learning_rate": 1e-4, "target_kl": 0.01}' (n_steps has its own option; batch_size defaults to
    min(64, n_steps x n_envs))"""
    network: str = "mlp"
    """policy network: 'mlp' or 'transformer' (the Transformer of Eq. 7 over --history states)"""
    history: int = DEFAULT_HISTORY
    """states the transformer policy attends over"""
    warm_start: str = "hindsight:scaled_delta"
    """'hindsight': behaviour-clone the hindsight oracle first (the water-fill of each episode's budget over
    the Fisher estimate of what each layer's rank costs on that input), on a dataset of --warm-start-episodes
    episodes built once per env configuration and cached under $DRRL_CACHE_DIR/datasets; 'hindsight:scaled_delta':
    the same water-fill over Eq. S (each input's attention-output change times a scale fitted on validation text),
    the teacher an agent shown --sensitivity-estimate scaled_delta can copy exactly; 'none': start from scratch.
    --bc-dataset or --bc-model replace it"""
    residual: bool = False
    """a residual agent: its action is an offset (-2..+2 candidate steps) from the static allocation of the budget
    (oracle.static, Fisher profile of validation text; drrl_env.wrappers.RankOffsets), it starts there (offset 0's
    logit +2), and each episode's reward is log(KL_static / KL) on the same batch (--kl-baseline
    reference_log_ratio unless given); needs one --flops-budget and one rank per layer; no warm start"""
    warm_start_episodes: int = 24
    """episodes of the hindsight dataset of --warm-start hindsight (about 10 s each on the 2-core CPU at 1x128)"""
    bc_dataset: str | None = None
    """oracle dataset (python -m oracle): behaviour-clone on it first"""
    verify: bool = True
    """check --bc-dataset's shards against its checksums.json; --no-verify loads one without it, unverified"""
    bc_model: str | None = None
    """start from this behaviour-cloned agent file (.safetensors, from python -m agents.bc)"""
    bc_epochs: int = 100
    """behaviour-cloning epochs with --bc-dataset"""
    bc_entropy_coef: float = 0.05
    """entropy bonus of behaviour cloning (--warm-start, --bc-dataset); > 0 leaves PPO room to explore"""
    bc_temperature: float = 1.0
    """temperature of the warm start's action logits (--warm-start, --bc-dataset, --bc-model): PPO starts from the
    clone's logits divided by it. Its argmax (the deterministic policy) is unchanged; below 1 the sampled policy
    stays near it, so PPO's samples deviate mostly where the clone is unsure, between near-tied actions
    (docs/findings.md, "Does RL beat its teacher?")"""
    value_warmup_steps: int = 0
    """env steps at the start of training that update the critic only (the actor stays at its warm start): a
    behaviour-cloned actor comes with a random critic, whose first advantages are noise (PIRLNav's critic warm-up);
    actor-critic algorithms only"""
    logdir: str = "runs"
    """folder of the runs"""
    run_name: str | None = None
    """name of this run's folder under --logdir, its id in tables and legends (default:
    DRRL-Attention-v0__ALGO__SEED__TIME); a folder that exists is refused (continue one with --resume)"""
    checkpoint_every: int = 0
    """checkpoint every N env steps (0: only at the end)"""
    resume: str | None = None
    """run folder to continue from its newest good checkpoint, with the options it was started with;
    --total-timesteps (the total), --checkpoint-every, --eval-every, --vec, --device and the comparison options may
    change, others given with other values are refused"""
    trust_pickle: bool = False
    """allow loading SB3 .zip models (--bc-model, zip policies in --compare): they are pickles, and a crafted one
    runs code when loaded; agent .safetensors files need no trust"""
    eval_every: int = 0
    """log the test PPL of the agent every N env steps (0: never)"""


@dataclass
class CompareConfig:
    """The comparison train_agent.py prints after training."""

    compare: tuple[str, ...] = BEST_COMPARE
    """policy specs to compare the agent with on the test split (the option with no spec: skip the comparison);
    DRRL-KVCache-v0: names of oracle.kvcache's policies or agent files"""
    eval_episodes: int = 4
    """test episodes per policy (DRRL-KVCache-v0: test prompts, each at both ends of the --cache-budget range)"""
    timing_repeats: int = 2
    """timed forward replays per policy for ms/token"""


@dataclass
class RunOptions:
    """One training run's options, parsed once: how it trains, what it is compared with, and its env."""

    train: TrainConfig
    compare: CompareConfig
    env_id: str
    """the registered id whose settings the env options started from"""
    env: dict[str, Any]
    """``gym.make`` keywords: every EnvConfig field"""

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> RunOptions:
        """From a parsed command line as a mapping (``vars(args)``, or :func:`resume_options`)."""
        return cls(
            dataclass_from_options(TrainConfig, options),
            dataclass_from_options(CompareConfig, options),
            options["env"],
            env_kwargs(options),
        )

    def to_json(self) -> dict[str, Any]:
        """The options by their command-line names, JSON-ready: what a run's config.json stores."""
        flat = {**dataclasses.asdict(self.train), **dataclasses.asdict(self.compare), "env": self.env_id, **self.env}
        return json.loads(json.dumps(flat, default=str))


def _canonical(value: Any) -> Any:
    """A stored or parsed option value in one comparable form (JSON types; a one-element list is its element)."""
    value = json.loads(json.dumps(value, default=str))
    return value[0] if isinstance(value, list) and len(value) == 1 else value


NEVER_FROM_A_FILE = frozenset({"trust_pickle"})
"""options a resumed run takes from the command line only, never from the run's config.json: trust is given, not
read from a file someone may have edited"""


def resume_options(
    parser: argparse.ArgumentParser, argv: list[str] | None, resumable: Collection[str], command: str
) -> dict[str, Any]:
    """The parsed options (``vars`` of the namespace) of a new run, or of a resumed one: RUN/config.json's.

    With ``--resume RUN`` the run's stored options are taken, and the options given on the command line
    must agree with them, except those named in ``resumable`` (a ``ValueError`` lists the others, one
    line). ``command`` names the program whose run folders these are, for the error messages.
    """
    options = vars(parser.parse_args(argv))
    if not options.get("resume"):
        return options
    resume = options["resume"]
    config = Path(resume, "config.json")
    if not config.is_file():
        raise ValueError(f"--resume {resume}: not a run folder of {command} (no config.json)")
    try:
        stored = json.loads(config.read_text())
        if not isinstance(stored, dict):
            raise ValueError("not a JSON object")
    except ValueError as error:
        raise ValueError(f"--resume {resume}: {config} is unreadable ({error}); the run cannot be resumed") from None
    for action in parser._actions:  # the same parser without defaults sees only what was given
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_args(argv))
    differing = [
        f"--{name.replace('_', '-')} (run: {stored[name]!r}, given: {value!r})"
        for name, value in given.items()
        if name in stored and name not in resumable and _canonical(stored[name]) != _canonical(value)
    ]
    if differing:
        raise ValueError(
            f"--resume {resume} was started with other options: {'; '.join(differing)}; "
            "drop them to continue the run as it was, or start a new run"
        )
    kept = {name: value for name, value in stored.items() if name in options and name not in given}
    kept = {name: value for name, value in kept.items() if name not in NEVER_FROM_A_FILE}
    return {**options, **kept}


def chosen_preset(argv: list[str] | None) -> tuple[Preset, str]:
    """``--preset`` and ``--env`` of ``argv``, read before the full parse (they set the other options' defaults).

    ``--env DRRL-KVCache-v0`` without a ``--preset`` takes :data:`KV_PRESET`. A preset of one env family with an id
    of the other (the key-cache env and the DRRL-Attention ids take different options) is a ``ValueError``.
    """
    name = preparse(argv, "--preset", sorted(PRESETS), DEFAULT_PRESET)
    env_id = env_id_of(argv, PRESETS[name].env, ENV_IDS)
    given = any(arg == "--preset" or arg.startswith("--preset=") for arg in (sys.argv[1:] if argv is None else argv))
    if env_id == KVCACHE_ENV_ID and not given:
        name = KV_PRESET
    if (env_id == KVCACHE_ENV_ID) != (PRESETS[name].env == KVCACHE_ENV_ID):
        raise ValueError(f"--preset {name} trains in {PRESETS[name].env}, not in --env {env_id}")
    return PRESETS[name], env_id


def add_comparison_and_env_arguments(parser: argparse.ArgumentParser, preset: Preset, env_id: str) -> None:
    """The options both training commands share after their own: CompareConfig's, then EnvConfig's.

    Their defaults are ``preset``'s comparison, and the settings of the variant ``env_id`` (with the preset's).
    """
    add_dataclass_arguments(
        parser,
        CompareConfig,
        "comparison after training",
        defaults={"compare": preset.compare},
        types={"eval_episodes": at_least(1), "timing_repeats": at_least(0)},
        nargs={"compare": "*"},
    )
    add_env_arguments(parser, env_id, ENV_IDS, **preset.env_options)


def parse_hyperparams(text: str | None, accepted: Collection[str], owner: str) -> dict[str, Any]:
    """``--hyperparams`` (a JSON object) as keyword arguments of ``owner``; one-line errors for bad JSON or names."""
    if not text:
        return {}
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--hyperparams {text!r} is not JSON: {error.msg}") from error
    if not isinstance(values, dict):
        raise ValueError(f"--hyperparams must be a JSON object of keyword arguments, got {text!r}")
    unknown = sorted(set(values) - set(accepted))
    if unknown:
        raise ValueError(f"--hyperparams: {owner} takes no {unknown}; it takes {sorted(accepted)}")
    return values
