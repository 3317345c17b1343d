"""``EnvConfig``: every argument of the DRRL-Attention envs, validated, and the registered variants.

The defaults are the recommended MDP, the one the project's best agent is trained in
(``python train_agent.py`` with no options; docs/env.md): one rank per key/value head group of
each layer, ``joint`` spectra, 1 x 128 tokens, a budget of 0.625 of full attention's logit FLOPs
enforced by the mask, reward -KL to the full model, and the Eq. S signal in the observation. Every
other MDP is a registered id (:data:`VARIANTS`), not a changed default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from drrl_env.attention.lowrank import SPECTRAL_MODES
from drrl_env.lm.corpora import DEFAULT_CORPUS
from drrl_env.lm.models import DEFAULT_MODEL

DEFAULT_RANKS = (16, 24, 32, 40, 48, 56, 64)
MAX_SENSITIVITY_SAMPLES = 1024
"""label samples of a Fisher profile at most: each is a backward pass per episode (16 is the default's)"""
MAX_WEIGHT = 1e6  # reward weights above this overflow rewards to inf or swamp every other term
REWARDS = ("auto", "kl", "eq13")
KL_BASELINES = (
    "none", "uniform", "uniform_log_ratio", "reference", "reference_log_ratio", "waterfill", "waterfill_log_ratio"
)  # fmt: skip
KL_CREDITS = ("terminal", "completion", "model")
GUARDRAILS = ("exact", "eq9", "off")
SPLITS = ("train", "validation", "test")
SENSITIVITY_ESTIMATES = ("fisher", "scaled_delta")


ENV_ID = "DRRL-Attention-v0"
"""the recommended MDP: EnvConfig's defaults"""
PER_LAYER_ENV_ID = "DRRL-Attention-PerLayer-v0"
"""one rank per layer, shown no per-input signal (the per-layer agent of docs/findings.md)"""
PAPER_ENV_ID = "DRRL-Attention-Paper-v0"
"""the paper's MDP: separate Q/K truncation, the per-step Eq. 13 reward, the Eq. 9 guardrail, no budget"""
VARIANTS: dict[str, dict[str, Any]] = {
    ENV_ID: {},
    PER_LAYER_ENV_ID: {"per_head": False, "sensitivity_samples": 0, "sensitivity_estimate": "fisher"},
    PAPER_ENV_ID: {
        "per_head": False,
        "sensitivity_samples": 0,
        "sensitivity_estimate": "fisher",
        "spectral_mode": "separate",
        "batch_size": 2,
        "seq_len": 256,
        "flops_budget": None,
        "reward": "eq13",
        "guardrail": "eq9",
        "eps0": 0.5,
    },
}
"""every registered id and its ``gym.make`` keywords over EnvConfig's defaults"""


@dataclass
class EnvConfig:
    """Arguments of DRRL-Attention-v0 (every field is a ``gym.make`` keyword)."""

    model: str = DEFAULT_MODEL
    """causal LM: the offline default, a local folder, or a hub id"""
    corpus: str = DEFAULT_CORPUS
    """corpus the episodes' text is drawn from"""
    split: str = "train"
    """corpus split: train, validation or test"""
    batch_size: int = 1
    """sequences per episode (B)"""
    seq_len: int = 128
    """tokens per sequence (n)"""
    segment_len: int | None = None
    """queries per segment (T); None: one segment per layer"""
    ranks: tuple[int, ...] = DEFAULT_RANKS
    """candidate ranks; the action is an index into this sorted list"""
    per_head: bool = True
    """one rank per key/value head group (MultiDiscrete) instead of one per layer"""
    spectral_mode: str = "joint"
    """'separate' (the paper's Q/K truncation), 'joint' (optimal logit truncation) or 'calibrated' (no per-input
    spectra: each key/value group's joint basis of the wiki validation split, drrl_env.profiles.calibration,
    cached on disk)"""
    flops_budget: float | tuple[float, float] | None = 0.625
    """episode logit FLOPs over full attention's (0.625: mean rank 40 of 64), enforced by the mask; (lo, hi): drawn per
    episode; None: no budget (the paper's MDP)"""
    reward: str = "auto"
    """'kl' (end-to-end: -KL to the full model, with potential-based shaping), 'eq13' (the paper's per-step reward),
    or 'auto' (kl with a budget, eq13 without)"""
    kl_shaping_weight: float = 0.0
    """weight w of the shaping potential -w * (relative residual-stream deviation) of the kl reward; 0: terminal only
    (the default: with shaping, PPO from the cloned start learned to spend the budget early, docs/findings.md)"""
    kl_baseline: str = "none"
    """kl reward only: 'uniform' subtracts from the terminal -KL the -KL of uniform ranks at the episode's budget on
    the same batch (one more forward per episode), so the return measures the policy against a fixed rule on this
    input; 'uniform_log_ratio' makes it log(KL_uniform / KL), the relative improvement, free of the input's scale
    too; 'reference' and 'reference_log_ratio' do the same against ``reference_ranks`` (e.g. the static allocation);
    'waterfill' and 'waterfill_log_ratio' against the water-fill of the episode's own sensitivity profile at its
    budget (the hindsight teacher's allocation of this batch; needs sensitivity_samples > 0 and a flops_budget), so
    the return is what the policy's allocation gains over its teacher's on this input;
    'none': the plain -KL (drrl_env.reward.kl_terminal_reward)"""
    kl_credit: str = "terminal"
    """kl reward with a 'waterfill' baseline: 'terminal' gives the return at the last step; 'completion' credits each
    step with what it changes in the KL of its plan completed by the teacher (the ranks taken so far, then the
    water-fill of the budget left over the rest of the profile): potential-based shaping that sums to the terminal
    reward, one forward pass per step that leaves the plan (drrl_env.credit; needs one segment per layer); 'model'
    the same with each plan scored by the profile's additive model (no forward pass) and the last step paying the
    rest, so the return is still the terminal reward exactly"""
    reference_ranks: tuple[int, ...] | None = None
    """one candidate rank per layer (every segment of a layer plays it): a fixed allocation that the 'reference' kl
    baselines score each episode against and that drrl_env.wrappers.RankOffsets offsets; None: none"""
    sensitivity_samples: int = 16
    """label samples of the Fisher estimate of this input's layer sensitivity profile, computed at reset (one
    forward and this many backward passes; drrl_env.profiles.sensitivity) and shown in the observation's 'sensitivity'
    part; 0: no such part (the observation of earlier versions)"""
    sensitivity_estimate: str = "scaled_delta"
    """how the 'sensitivity' part is estimated: 'fisher', each input's Fisher profile (sensitivity_samples backward
    passes per episode); 'scaled_delta', each input's attention-output change at every candidate (one forward
    pass, no backward) times a per-cell scale fitted once on validation text by a sensitivity_samples Fisher
    profile and cached (drrl_env.profiles.delta_scale)"""
    alpha: float = 1.0
    """weight of the fidelity term of Eq. 13"""
    beta: float = 0.5
    """weight of the FLOPs term of Eq. 13"""
    gamma: float = 0.1
    """weight of the perturbation term of Eq. 13"""
    guardrail: str = "off"
    """'exact' (mask ranks whose relative logit error vs full attention exceeds eps_t), 'eq9' (the paper's
    transition bound), or 'off'"""
    eps0: float = 0.2
    """initial guardrail threshold on the relative logit error (Eq. 11); what each value masks: docs/benchmarks.md"""
    eps_decay: float = 1e-5
    """guardrail annealing rate lambda per training step t (Eq. 11); t is set by the trainer, not counted by the env"""
    violation_penalty: float = 0.1
    """reward penalty when a masked action arrives (it is executed as the nearest allowed rank)"""
    terminal_lm_weight: float = 0.0
    """eq13 only: weight of a terminal reward, LM loss at full rank minus LM loss with the chosen ranks"""
    device: str = "auto"
    """'auto' (CUDA when present), 'cpu' or 'cuda'"""

    def __post_init__(self) -> None:
        def positive_int(name: str, value: Any, minimum: int = 1, maximum: int | None = None) -> None:
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
            if maximum is not None and value > maximum:
                raise ValueError(f"{name} must be an integer <= {maximum}, got {value!r}")

        def choice(name: str, options: tuple[str, ...]) -> None:
            if getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {options}, got {getattr(self, name)!r}")

        positive_int("batch_size", self.batch_size)
        positive_int("seq_len", self.seq_len, 2)
        positive_int("sensitivity_samples", self.sensitivity_samples, 0, MAX_SENSITIVITY_SAMPLES)
        if self.segment_len is not None:
            positive_int("segment_len", self.segment_len)
            if self.segment_len > self.seq_len:
                raise ValueError(f"segment_len ({self.segment_len}) must not exceed seq_len ({self.seq_len})")
        self.ranks = _rank_tuple(self.ranks)
        if not isinstance(self.per_head, (bool, np.bool_)):
            raise ValueError(f"per_head must be True or False, got {self.per_head!r}")
        for name in ("model", "corpus", "device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.guardrail is True or self.guardrail is False:  # the boolean of earlier versions
            self.guardrail = "exact" if self.guardrail else "off"
        choice("spectral_mode", SPECTRAL_MODES)
        choice("split", SPLITS)
        choice("reward", REWARDS)
        choice("kl_baseline", KL_BASELINES)
        choice("kl_credit", KL_CREDITS)
        choice("guardrail", GUARDRAILS)
        choice("sensitivity_estimate", SENSITIVITY_ESTIMATES)
        for name in ("alpha", "beta", "gamma", "violation_penalty", "terminal_lm_weight", "kl_shaping_weight"):
            _check_number(name, getattr(self, name), minimum=0.0, maximum=MAX_WEIGHT)
        _check_number("eps_decay", self.eps_decay, minimum=0.0)
        _check_number("eps0", self.eps0, minimum=0.0, strict=True)
        self.flops_budget = _budget_range(self.flops_budget)
        if self.reference_ranks is not None:
            reference = _rank_tuple(self.reference_ranks, distinct=False, name="reference_ranks")
            missing = sorted(set(reference) - set(self.ranks))
            if missing:
                raise ValueError(f"reference_ranks must be candidate ranks {self.ranks}, got {missing} among them")
            self.reference_ranks = reference
        if self.kl_baseline.startswith("reference") and self.reference_ranks is None:
            raise ValueError(f"kl_baseline={self.kl_baseline!r} needs reference_ranks (one candidate rank per layer)")
        if self.kl_baseline.startswith("waterfill") and (not self.sensitivity_samples or self.flops_budget is None):
            raise ValueError(
                f"kl_baseline={self.kl_baseline!r} water-fills the episode's sensitivity profile and needs "
                f"sensitivity_samples > 0 and a flops_budget (got {self.sensitivity_samples} and {self.flops_budget})"
            )
        if self.kl_credit != "terminal" and not self.kl_baseline.startswith("waterfill"):
            raise ValueError(
                f"kl_credit={self.kl_credit!r} completes each step's plan with the water-fill teacher and needs "
                f"kl_baseline='waterfill' or 'waterfill_log_ratio', got {self.kl_baseline!r}"
            )
        if self.kl_credit != "terminal" and self.segment_len is not None and self.segment_len < self.seq_len:
            raise ValueError(
                f"kl_credit={self.kl_credit!r} plans one rank per layer and needs one segment per layer "
                f"(segment_len None or >= seq_len), got segment_len={self.segment_len} with seq_len={self.seq_len}"
            )

    @property
    def reward_kind(self) -> str:
        """The reward in force: ``reward``, with ``'auto'`` resolved (kl under a budget, eq13 without)."""
        if self.reward != "auto":
            return self.reward
        return "eq13" if self.flops_budget is None else "kl"

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> EnvConfig:
        """Build from ``gym.make`` keywords; unknown keywords get an error listing the valid ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(f"DRRL-Attention got unknown argument(s) {unknown}; valid arguments: {names}")
        return cls(**kwargs)

    def to_json(self) -> dict[str, Any]:
        """The configuration as JSON-ready ``gym.make`` keywords (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _is_real(value: Any) -> bool:
    """``value`` is a Python or NumPy real number (a bool is not)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _check_number(name: str, value: Any, minimum: float, strict: bool = False, maximum: float = math.inf) -> None:
    """``value`` must be a real number in ``[minimum, maximum]`` (``(minimum, maximum]`` with ``strict``)."""
    in_range = _is_real(value) and math.isfinite(value) and minimum <= value <= maximum
    if not in_range or (strict and value == minimum):
        low = f"{'>' if strict else '>='} {minimum:g}"
        high = f" and <= {maximum:g}" if math.isfinite(maximum) else ""
        raise ValueError(f"{name} must be a finite number {low}{high}, got {value!r}")


def _rank_tuple(ranks: Any, distinct: bool = True, name: str = "ranks") -> tuple[int, ...]:
    """``ranks`` as a sorted tuple of distinct positive integers, or with ``distinct=False`` positive integers in order.

    Anything else is a ``ValueError`` naming the argument ``name``.
    """
    what = "distinct positive integers" if distinct else "positive integers"
    if isinstance(ranks, (str, bytes)) or np.ndim(ranks) != 1 or len(ranks) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of {what}, got {ranks!r}")
    values = []
    for rank in ranks:
        integral = isinstance(rank, (int, np.integer)) or (
            isinstance(rank, (float, np.floating)) and math.isfinite(rank) and float(rank).is_integer()
        )
        if isinstance(rank, (bool, np.bool_)) or not integral or rank < 1:
            raise ValueError(f"{name} must be {what}, got {ranks!r} (entry {rank!r})")
        values.append(int(rank))
    if not distinct:
        return tuple(values)
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must be {what}, got {ranks!r} (repeated entries)")
    return tuple(sorted(values))


def check_budget_share(name: str, value: Any) -> float:
    """``value`` as a float if it is a budget share: a real number in ``(0, 1]`` of full attention's logit FLOPs.

    Anything else (NaN, a bool, a string, 0, 1.5) is a ``ValueError`` naming ``name``.
    """
    if not _is_real(value) or not 0 < value <= 1:
        raise ValueError(f"{name} must lie in (0, 1] (a share of full attention's logit FLOPs), got {value!r}")
    return float(value)


def _budget_range(budget: Any) -> tuple[float, float] | None:
    """``flops_budget`` as ``(lo, hi)`` (a single budget is ``(b, b)``), checked to lie in ``(0, 1]``."""
    if budget is None:
        return None
    values = [budget] if np.ndim(budget) == 0 else list(np.asarray(budget, dtype=object).ravel())
    if len(values) not in (1, 2):
        raise ValueError(f"flops_budget must be a number, a (lo, hi) pair or None, got {budget!r}")
    lo, hi = (check_budget_share("flops_budget", value) for value in (values[0], values[-1]))
    if lo > hi:
        raise ValueError(f"flops_budget range must have lo <= hi, got {budget!r}")
    return lo, hi
