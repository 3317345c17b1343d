"""Heuristic and reference rank policies, all with the :class:`oracle.policy.RankPolicy` interface.

Every policy here only picks ranks the guardrail allows: where its preferred rank is masked, it
takes the allowed candidate nearest to it (ties: the larger), which is also what the env would
execute. In a ``per_head`` env each rule runs once per key/value group, on the group's part of the
mask and of the observation's NER (:func:`for_each_group`; ``stable_rank`` and ``threshold`` keep one
target per layer), and returns one candidate per group; where the groups' choices together would
exceed the budget, the env lowers them (``drrl_env.episode``). Build one from a spec string with
:func:`make_baseline` (``fixed:32``, ``energy:0.9``):

============== ===================================================================================
``full``        the largest candidate rank (for ``ranks`` up to ``head_dim``: full rank)
``fixed:R``     the candidate nearest to ``R`` (the paper's static baseline uses 32)
``uniform``     spends the FLOPs budget evenly: the largest candidate within the share of it left per
                remaining step (from the observation), i.e. uniform rank at the budget
``energy:T``    "Adaptive SVD": the smallest candidate whose NER (Eq. 14) reaches ``T``
``random``      a uniformly random allowed candidate (seeded per episode)
``stable_rank`` seed 003's controller: stable rank ``||X||_F^2 / sigma_max^2`` (power iteration,
                Eq. 16) of the Q and K blocks, times a safety factor, smoothed by an EMA over the
                episode's steps, with hysteresis (the rank moves only when the target leaves a
                band around it); ``stable_rank:SAFETY``
``threshold:D`` seed 004's thresholding: the number of singular values above ``D * sigma_max``
``gumbel:TAU``  seed 004's Gumbel-softmax selection at temperature ``TAU`` over the scores
                ``NER(r) - r / d`` (energy kept minus width used), a seeded Gumbel-max sample
``static:F``    static per-layer allocation of a budget ``F`` of logit FLOPs, from a label-free KL profile
                of validation text (see :mod:`oracle.static`); ``static``: each episode's own budget;
                ``static:fisher``, ``static:F:fisher``: the profile's Fisher estimate; ``static:decode``,
                ``static:F:decode``: a profile of generation with a low-rank key cache (for ``agents.generate``)
``layers:R,R,…`` one given rank per layer, e.g. an allocation ``experiments/key_cache_profile.py`` printed (the
                candidate nearest to each; the nearest allowed where the mask forbids it)
``oracle``      the greedy oracle (:class:`oracle.GreedyOracle`)
``hindsight``   the hindsight oracle (:class:`oracle.hindsight.HindsightOracle`): the same water-fill on
                each input's own KL profile, the ceiling of per-input layer allocation;
                ``hindsight:fisher`` estimates the profile from the Fisher information (4-5x cheaper),
                ``hindsight:fisher:S`` from ``S`` label samples (default 16); ``hindsight:scaled_delta[:S]``
                from the input's attention-output change times a scale fitted on validation text (one
                forward per input; :mod:`drrl_env.profiles.delta_scale`)
============== ===================================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from drrl_env.attention.spectra import power_iteration_spectral_norm
from drrl_env.config import check_budget_share
from drrl_env.env import DRRLAttentionEnv
from drrl_env.guardrail import nearest_allowed
from oracle.hindsight import HindsightOracle, LayerAllocationPolicy
from oracle.policy import GreedyOracle, RankPolicy
from oracle.static import STATIC_ESTIMATES, StaticAllocation


def smallest_allowed_at_least(target_rank: float, action_mask: np.ndarray, ranks: np.ndarray | tuple) -> int:
    """Index of the smallest allowed candidate ``>= target_rank``; the largest allowed one if none is."""
    ranks = np.asarray(ranks)
    allowed = np.asarray(action_mask, dtype=bool)
    above = np.flatnonzero(allowed & (ranks >= target_rank))
    return int(above[0]) if len(above) else int(np.flatnonzero(allowed)[-1])


def for_each_group(
    observation: np.ndarray,
    action_mask: np.ndarray,
    env: DRRLAttentionEnv,
    choose: Callable[[np.ndarray, np.ndarray], int],
) -> int | np.ndarray:
    """A per-layer rule ``choose(mask (K,), ner (K,)) -> candidate index`` applied to each key/value group.

    One rank per layer: one call with the step's mask and NER, its index returned. Per-head ranks: one
    call per group with the group's parts of the group-major mask and NER, ``(Hkv,)`` indices returned.
    """
    num_candidates = len(env.config.ranks)
    masks = np.asarray(action_mask, dtype=bool).reshape(-1, num_candidates)
    ners = np.asarray(observation, dtype=np.float64)[env.observation_slices["ner"]].reshape(-1, num_candidates)
    choices = [int(choose(mask, ner)) for mask, ner in zip(masks, ners, strict=True)]
    return np.array(choices, dtype=np.int64) if env.config.per_head else choices[0]


class _Deterministic:
    def reset(self, seed: int) -> None:
        del seed


class FullRank(_Deterministic):
    """The largest allowed candidate rank (under a budget: as much as it allows, as early as it allows)."""

    name = "full"

    def act(self, observation: np.ndarray, action_mask: np.ndarray, env: DRRLAttentionEnv) -> int | np.ndarray:
        return for_each_group(observation, action_mask, env, lambda mask, ner: np.flatnonzero(mask)[-1])


@dataclass
class FixedRank(_Deterministic):
    """The candidate nearest to ``rank`` (the allowed one nearest to it where the guardrail masks it)."""

    rank: int = 32

    @property
    def name(self) -> str:
        return f"fixed:{self.rank}"

    def act(self, observation: np.ndarray, action_mask: np.ndarray, env: DRRLAttentionEnv) -> int | np.ndarray:
        return for_each_group(
            observation, action_mask, env, lambda mask, ner: nearest_allowed(self.rank, mask, env.config.ranks)
        )


class UniformBudget(_Deterministic):
    """The largest allowed candidate within the budget's share left per remaining step: uniform rank at the budget.

    The strongest non-adaptive baseline under a ``flops_budget``; without one it is full rank.
    """

    name = "uniform"

    def act(self, observation: np.ndarray, action_mask: np.ndarray, env: DRRLAttentionEnv) -> int | np.ndarray:
        _, left_share = np.asarray(observation)[env.observation_slices["budget"]]
        target = float(left_share) * env.head_dim * (1 + 1e-6)  # float32 rounding of the observation
        ranks = np.asarray(env.config.ranks)

        def choose(mask: np.ndarray, ner: np.ndarray) -> int:
            within = np.flatnonzero(mask & (ranks <= target))
            return int(within[-1]) if len(within) else smallest_allowed_at_least(0, mask, ranks)

        return for_each_group(observation, action_mask, env, choose)


@dataclass
class EnergyThreshold(_Deterministic):
    """Adaptive SVD: the smallest candidate whose NER (Eq. 14, in the observation) reaches ``threshold``."""

    threshold: float = 0.9

    @property
    def name(self) -> str:
        return f"energy:{self.threshold:g}"

    def act(self, observation: np.ndarray, action_mask: np.ndarray, env: DRRLAttentionEnv) -> int | np.ndarray:
        ranks = env.config.ranks

        def choose(mask: np.ndarray, ner: np.ndarray) -> int:
            reaching = np.flatnonzero(ner >= self.threshold)
            return smallest_allowed_at_least(ranks[reaching[0]] if len(reaching) else ranks[-1], mask, ranks)

        return for_each_group(observation, action_mask, env, choose)


class RandomRank:
    """A uniformly random allowed candidate, from a generator reseeded at each episode."""

    name = "random"

    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)

    def reset(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def act(self, observation: np.ndarray, action_mask: np.ndarray, env: DRRLAttentionEnv) -> int | np.ndarray:
        return for_each_group(observation, action_mask, env, lambda mask, ner: self.rng.choice(np.flatnonzero(mask)))


def stable_rank(x: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """Stable rank ``||X||_F^2 / sigma_max^2`` of each ``(..., n, d)`` block, sigma_max by power iteration (Eq. 16).

    Power iteration converges from below, so this slightly overestimates the stable rank.
    """
    generator = torch.Generator().manual_seed(0)
    sigma_max = power_iteration_spectral_norm(x, iterations, generator)
    frobenius = x.to(torch.float64).square().sum(dim=(-1, -2))
    return (frobenius / sigma_max.square().clamp_min(torch.finfo(torch.float64).tiny)).cpu()


@dataclass
class StableRankController:
    """Seed 003's rank controller, adapted to attention: stable rank, safety factor, EMA and hysteresis.

    Per step, the target is ``safety * max(mean stable rank of the Q blocks, of the K blocks)``;
    ``ema = smoothing * ema + (1 - smoothing) * target`` over the episode's steps (started at
    the first target); the current rank moves to the smallest allowed candidate ``>= ema`` only
    when ``|ema - current| > hysteresis * current``, and otherwise stays (or the nearest allowed).
    """

    safety: float = 2.0
    smoothing: float = 0.5
    hysteresis: float = 0.1
    iterations: int = 3
    _ema: float | None = field(default=None, repr=False)
    _current: float | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"stable_rank:{self.safety:g}"

    def reset(self, seed: int) -> None:
        self._ema, self._current = None, None

    def act(self, observation: np.ndarray, action_mask: np.ndarray, env: DRRLAttentionEnv) -> int | np.ndarray:
        call = env.attention_call
        target = self.safety * max(
            float(stable_rank(call.query, self.iterations).mean()), float(stable_rank(call.key, self.iterations).mean())
        )
        self._ema = target if self._ema is None else self.smoothing * self._ema + (1 - self.smoothing) * target
        ranks = env.config.ranks
        if self._current is None or abs(self._ema - self._current) > self.hysteresis * self._current:
            ema = self._ema
            choice = for_each_group(
                observation, action_mask, env, lambda mask, ner: smallest_allowed_at_least(ema, mask, ranks)
            )
        else:
            current = self._current
            choice = for_each_group(
                observation, action_mask, env, lambda mask, ner: nearest_allowed(current, mask, ranks)
            )
        self._current = float(np.mean(np.asarray(ranks)[choice]))
        return choice


@dataclass
class SpectralThreshold(_Deterministic):
    """Seed 004's thresholding: rank = number of singular values above ``delta * sigma_max`` (mean over Q, K blocks)."""

    delta: float = 0.1

    @property
    def name(self) -> str:
        return f"threshold:{self.delta:g}"

    def act(self, observation: np.ndarray, action_mask: np.ndarray, env: DRRLAttentionEnv) -> int | np.ndarray:
        call = env.attention_call
        counts = [
            (sigma > self.delta * sigma[..., :1]).sum(-1).double().mean()
            for sigma in (call.query_spectrum.singular_values, call.key_spectrum.singular_values)
        ]
        target, ranks = float(max(counts)), env.config.ranks
        return for_each_group(
            observation, action_mask, env, lambda mask, ner: smallest_allowed_at_least(target, mask, ranks)
        )


@dataclass
class GumbelRank:
    """Seed 004's Gumbel-softmax selection: a Gumbel-max sample of ``softmax((NER(r) - r/d) / temperature)``."""

    temperature: float = 0.05
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0), repr=False)

    @property
    def name(self) -> str:
        return f"gumbel:{self.temperature:g}"

    def reset(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def act(self, observation: np.ndarray, action_mask: np.ndarray, env: DRRLAttentionEnv) -> int | np.ndarray:
        widths = np.asarray(env.config.ranks) / env.head_dim

        def choose(mask: np.ndarray, ner: np.ndarray) -> int:
            noisy = (ner - widths) / self.temperature + self.rng.gumbel(size=ner.shape)
            return int(np.argmax(np.where(mask, noisy, -np.inf)))

        return for_each_group(observation, action_mask, env, choose)


class GivenAllocation(LayerAllocationPolicy):
    """One given rank per layer, whatever the input and the budget (the mask still rules each step)."""

    def __init__(self, ranks: list[int]) -> None:
        super().__init__()
        if not ranks or any(rank < 1 for rank in ranks):
            raise ValueError(f"layers: needs one positive rank per layer, got {ranks}")
        self.ranks = ranks

    @property
    def name(self) -> str:
        return "layers:" + ",".join(str(rank) for rank in self.ranks)

    def allocate(self, env: DRRLAttentionEnv) -> list[int]:
        if len(self.ranks) != env.num_layers:
            raise ValueError(f"layers: got {len(self.ranks)} ranks for a model of {env.num_layers} layers")
        candidates = np.asarray(env.config.ranks)
        return [int(np.argmin(np.abs(candidates - rank))) for rank in self.ranks]


def parse_static_param(param: str) -> tuple[float | None, str]:
    """``static[:F][:ESTIMATE]``'s parameters: the budget ``F`` (None: each episode's) and the profile estimate.

    Either may come first. Checked here, before the (minutes-long) validation profile is taken.
    """
    budget, estimate = None, "exact"
    for part in filter(None, param.split(":")):
        if part in STATIC_ESTIMATES:
            estimate = part
            continue
        try:
            budget = check_budget_share("static's budget", float(part))
        except ValueError:
            raise ValueError(
                f"static takes a budget (a share of full attention's logit FLOPs in (0, 1]) and an estimate "
                f"(one of {STATIC_ESTIMATES}), got {part!r}"
            ) from None
    return budget, estimate


def static_from_spec(param: str, env_kwargs: dict) -> StaticAllocation:
    """``static[:F][:ESTIMATE]``: the budget ``F`` (none: each episode's) and the profile estimate, in any order."""
    budget, estimate = parse_static_param(param)
    return StaticAllocation.profile(budget, env_kwargs, estimate=estimate)


BASELINES = (
    "full", "fixed", "uniform", "energy", "random", "stable_rank", "threshold", "gumbel", "static", "oracle",
    "hindsight", "layers",
)  # fmt: skip


def check_baseline(spec: str) -> None:
    """Raise what :func:`make_baseline` would for ``spec``, without its cost (``static``'s validation profile)."""
    name, _, param = spec.partition(":")
    if name != "static":
        make_baseline(spec)  # every other baseline is built in microseconds, reading no model
        return
    try:
        parse_static_param(param)
    except ValueError as error:
        raise ValueError(f"bad parameter in policy spec {spec!r}: {error}") from error


def _number(param: str, default: float, what: str, low: float, high: float = math.inf, low_open: bool = True) -> float:
    """``param`` as a finite number in ``(low, high]`` (``[low, high]`` unless ``low_open``); ``default`` if absent."""
    if param == "":
        return default
    value = float(param)  # a ValueError names the text
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        if math.isinf(high):
            raise ValueError(f"{what} must be a finite number {'>' if low_open else '>='} {low:g}, got {param!r}")
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{what} must lie in {bounds}, got {param!r}")
    return value


def _rank(param: str, default: int | None = None, what: str = "a rank") -> int:
    """``param`` as a count such as a rank: an integer >= 1."""
    if param == "" and default is not None:
        return default
    if not param.strip().isdigit() or int(param) < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {param!r}")
    return int(param)


def make_baseline(spec: str, env_kwargs: dict | None = None) -> RankPolicy:
    """A baseline from ``NAME[:PARAM]`` (see the module docstring); ``static`` profiles on ``env_kwargs``'s model.

    A parameter is checked here, with one error for every command: ``fixed:0``, ``energy:2``, ``gumbel:-1``,
    ``layers:4,x`` and ``NAME:`` (a colon with nothing after it) are refused.
    """
    name, colon, param = spec.partition(":")
    try:
        if colon and not param:
            raise ValueError("a ':' with no parameter after it")
        if name == "full" and not param:
            return FullRank()
        if name == "fixed":
            return FixedRank(_rank(param, 32))
        if name == "uniform" and not param:
            return UniformBudget()
        if name == "energy":
            return EnergyThreshold(_number(param, 0.9, "energy's share of the spectrum", 0.0, 1.0))
        if name == "random" and not param:
            return RandomRank()
        if name == "stable_rank":
            return StableRankController(_number(param, 2.0, "stable_rank's safety factor", 0.0))
        if name == "threshold":
            return SpectralThreshold(_number(param, 0.1, "threshold's relative singular value", 0.0, 1.0))
        if name == "gumbel":
            return GumbelRank(_number(param, 0.05, "gumbel's temperature", 0.0))
        if name == "oracle" and not param:
            return GreedyOracle()
        if name == "static":
            return static_from_spec(param, env_kwargs or {})
        if name == "hindsight":
            estimate, _, samples = (param or "exact").partition(":")
            if samples and estimate == "exact":
                raise ValueError("only the estimates take a sample count (hindsight:fisher:S, ...:scaled_delta:S)")
            return (
                HindsightOracle(estimate, _rank(samples, what="the sample count"))
                if samples
                else HindsightOracle(estimate)
            )
        if name == "layers":
            return GivenAllocation([_rank(rank.strip()) for rank in param.split(",")])
    except ValueError as error:
        raise ValueError(f"bad parameter in policy spec {spec!r}: {error}") from error
    raise ValueError(f"unknown baseline {spec!r}; expected one of {BASELINES} as NAME or NAME:PARAM (e.g. fixed:32)")
