"""The training commands' options as dataclasses: one ``--field-name`` option per field, its docstring the help."""

from __future__ import annotations

import argparse
import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.policies import DEFAULT_HISTORY

DEFAULT_COMPARE = ("uniform", "static:fisher", "hindsight:fisher", "fixed:32", "energy:0.9", "oracle")
VEC_ENVS = ("sync", "subproc")
TRAIN_ENV_DEFAULTS = {
    "seq_len": 128,
    "batch_size": 1,
    "spectral_mode": "joint",
    "guardrail": "off",
    "kl_shaping_weight": 0.0,
}
"""The training commands' env defaults (train_agent.py, agents.rllib) where they differ from EnvConfig's:
1 x 128 tokens; the Eckart-Young-optimal 'joint' mode, where per-input allocation has the most headroom
(docs/results.md); the budget as the only constraint, as in AMC (a guardrail moves an allocation's ranks, and
the budget mask then takes it out of later layers); the terminal -KL alone (measured: with the shaping term, PPO
from the behaviour-cloned start learned to spend the budget in the early layers and tripled the KL)"""


@dataclass
class TrainConfig:
    """How train_agent.py trains (the env's options come from ``EnvConfig``)."""

    algo: str = "maskable_ppo"
    """RL algorithm, a name of the registry agents.algorithms.ALGORITHMS"""
    total_timesteps: int = 4500
    """env steps of training (with --resume: the total, steps already done included)"""
    seed: int = 0
    """seed of the agent and of the episodes"""
    n_envs: int = 1
    """parallel envs"""
    vec: str = "sync"
    """vector env: 'sync' (in-process) or 'subproc' (one process per env)"""
    n_steps: int = 150
    """rollout length per env and update for on-policy algorithms; it must be a multiple of the episode length
    (layers x segments), so that checkpoints fall at episode boundaries, which --resume needs. 150 is 5 episodes
    of 30 layers per update: measured on the per-head clone, such updates follow the noise of 5 terminal rewards;
    1500 (50 episodes, with batch_size 300) keeps PPO near its start (docs/results.md, section 2)"""
    hyperparams: str | None = None
    """keyword arguments of the algorithm's constructor as a JSON object, SB3's names, e.g.
    '{"learning_rate": 1e-4, "target_kl": 0.01}' (n_steps has its own option; batch_size defaults to
    min(64, n_steps x n_envs))"""
    policy: str = "mlp"
    """policy network: 'mlp' or 'transformer'"""
    history: int = DEFAULT_HISTORY
    """states the transformer policy attends over"""
    warm_start: str = "hindsight"
    """'hindsight': behaviour-clone the hindsight oracle first (the water-fill of each episode's budget over
    the Fisher estimate of what each layer's rank costs on that input), on a dataset of --warm-start-episodes
    episodes built once per env configuration and cached under $DRRL_CACHE_DIR/datasets; 'hindsight:scaled_delta':
    the same water-fill over Eq. S (each input's attention-output change times a scale fitted on validation text),
    the teacher an agent shown --sensitivity-estimate scaled_delta can copy exactly; 'none': start from scratch.
    --bc-dataset or --bc-model replace it"""
    residual: bool = False
    """a residual agent: its action is an offset (-2..+2 candidate steps) from the static allocation of the budget
    (agents.static, Fisher profile of validation text; drrl_env.wrappers.RankOffsets), it starts there (offset 0's
    logit +2), and each episode's reward is log(KL_static / KL) on the same batch (--kl-baseline
    reference_log_ratio unless given); needs one --flops-budget and one rank per layer; no warm start"""
    warm_start_episodes: int = 24
    """episodes of the hindsight dataset of --warm-start hindsight (about 10 s each on the 2-core CPU at 1x128)"""
    bc_dataset: str | None = None
    """oracle dataset (python -m oracle): behaviour-clone on it first"""
    bc_model: str | None = None
    """start from this behaviour-cloned agent file (.safetensors, from python -m agents.bc)"""
    bc_epochs: int = 30
    """behaviour-cloning epochs with --bc-dataset"""
    bc_entropy_coef: float = 0.05
    """entropy bonus of behaviour cloning (--warm-start, --bc-dataset); > 0 leaves PPO room to explore (measured:
    0.05 cloned the hindsight oracle as faithfully as 0, with a lower KL; docs/results.md)"""
    bc_temperature: float = 1.0
    """temperature of the warm start's action logits (--warm-start, --bc-dataset, --bc-model): PPO starts from the
    clone's logits divided by it. Its argmax (the deterministic policy) is unchanged; below 1 the sampled policy
    stays near it, so PPO's samples deviate mostly where the clone is unsure, between near-tied actions (measured
    at 0.3 with --kl-credit model: PPO then improves on clones that miss their teacher, docs/results.md, section 2)"""
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

    compare: tuple[str, ...] = DEFAULT_COMPARE
    """policy specs to compare the agent with on the test split (the option with no spec: skip the comparison)"""
    eval_episodes: int = 4
    """test episodes per policy"""
    timing_repeats: int = 2
    """timed forward replays per policy for ms/token"""


def _canonical(value: Any) -> Any:
    """A stored or parsed option value in one comparable form (JSON types; a one-element list is its element)."""
    value = json.loads(json.dumps(value, default=str))
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def resume_arguments(
    parser: argparse.ArgumentParser, argv: list[str] | None, resumable: Collection[str], command: str
) -> argparse.Namespace:
    """The options of a new run, or of a resumed one (``--resume RUN``): RUN/config.json's, with those given.

    A resumed run refuses (``ValueError``, one line listing them) options given with other values
    than it was started with, except those named in ``resumable``. ``command`` names the program
    whose run folders these are, for the error messages.
    """
    args = parser.parse_args(argv)
    if not args.resume:
        return args
    config = Path(args.resume, "config.json")
    if not config.is_file():
        raise ValueError(f"--resume {args.resume}: not a run folder of {command} (no config.json)")
    try:
        stored = json.loads(config.read_text())
        if not isinstance(stored, dict):
            raise ValueError("not a JSON object")
    except ValueError as error:
        raise ValueError(
            f"--resume {args.resume}: {config} is unreadable ({error}); the run cannot be resumed"
        ) from None
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
            f"--resume {args.resume} was started with other options: {'; '.join(differing)}; "
            "drop them to continue the run as it was, or start a new run"
        )
    for name, value in stored.items():
        if name in vars(args) and name not in given:
            setattr(args, name, value)
    return args


def add_comparison_and_env_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both training commands share after their own: CompareConfig's, then EnvConfig's (their defaults)."""
    from drrl_env.cli import add_dataclass_arguments, add_env_arguments, at_least

    add_dataclass_arguments(
        parser,
        CompareConfig,
        "comparison after training",
        types={"eval_episodes": at_least(1), "timing_repeats": at_least(0)},
        nargs={"compare": "*"},
    )
    add_env_arguments(parser, **TRAIN_ENV_DEFAULTS)


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
