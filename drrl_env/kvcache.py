"""DRRL-KVCache-v0: choose each layer's key-cache rank for generation, after looking at the first generated tokens.

An episode is one prompt of ``context`` tokens from the pool of its split. The prompt is prefilled exactly and the
full model generates its first ``observe_tokens`` tokens greedily with the full cache; then the agent commits the
key-cache rank of every layer, one step per layer (candidates ``ranks``); then the next ``horizon`` tokens of the
full model's own greedy continuation are scored teacher-forced through the compressed cache (keys projected on each
layer's basis of the prompt and the observed tokens, the attention sinks and the recent window exact, values at
full width: :mod:`drrl_env.generation.decode`). The reward, at the last step, is minus the mean per-token
``KL(p_full || p)`` of the scored tokens' next-token distributions (label-free), or with ``kl_baseline`` its
improvement on a fixed rule's KL on the same prompt and budget (the paired reward: ``KL_b - KL`` or
``log(KL_b / KL)``, the fixed rule uniform ranks or the static decode allocation).

**Budget.** A share ``cache_budget`` of the full key cache's bytes after the observed tokens (the exact sink and
window keys counted; values are always full and not part of it), enforced by the action mask as in
DRRL-Attention-v0: a rank is allowed only if the episode can still end within budget with every later layer at
the smallest candidate. A ``(lo, hi)`` range draws a budget per episode; the observation carries it.

**Observation**, at the step of layer ``l`` (``KVCacheObservation``): the relative logit error
``||Q (I - W_q W_k^T) K^T||_F^2 / ||Q K^T||_F^2`` of the observed tokens' queries against the prefix's keys in
layer ``l``'s basis at each candidate rank, the same for the prompt's last ``observe_tokens`` queries in the
prompt's own basis (:func:`drrl_env.generation.decode_profile.prefill_logit_errors`), the depth, the budget and
the budget left, and the ranks chosen so far. Only what is causal and cheap at commit time: the statistics come
from ``d x d`` Grams of queries and keys the prefill and the observed steps compute anyway (their FLOPs, counted
in ``info["flops_observation"]``; the extra forward passes that compute them here are an artefact of computing
them outside the generation's own hooks and are not charged).

**Cheap episodes.** What an episode needs of its prompt (the observed and scored tokens, the full model's logits
of the scored tokens, the key cache after the prefix at every candidate rank, the observation's statistics) is
computed once per prompt and kept for the ``cached_prompts`` most recently used prompts; an episode on a kept
prompt runs only the scored continuation at its ranks. Because the prefix is attended exactly, each layer's cache
at a rank does not depend on the other layers' ranks, so the caches of one prefill per candidate rank combine into
the cache of any allocation (as :func:`drrl_env.generation.decode_profile.decode_kl_profile` does). Within a
:func:`shared_prompt_states` block the envs of one process also share the states of equal prompts and settings
(``train_agent.py`` records the teacher's dataset in one env and trains in another: one precomputation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from drrl_env.generation.decode import rank_table
from drrl_env.generation.decode_profile import (
    ATTENTION_KL_QUERIES,
    continued_logits,
    greedy_continuation,
    observed_attention_kls,
    prefill_logit_errors,
    prefilled,
)
from drrl_env.generation.kv_attention import RECENT_TOKENS, SINK_TOKENS, KeyBasisAttention
from drrl_env.generation.kv_cache import LowRankKeyCache, layer_bytes
from drrl_env.lm.corpora import DEFAULT_CORPUS, EVALUATION_ONLY, corpus_tokens, sequential_chunks
from drrl_env.lm.models import DEFAULT_MODEL, LoadedModel, load_causal_lm, resolve_device
from drrl_env.lm.scoring import next_token_kl
from drrl_env.profiles.validation import DECODE_PROFILE_PROMPTS, validation_profile
from drrl_env.profiles.waterfill import allocate_ranks
from drrl_env.reward import kl_terminal_reward

KVCACHE_ENV_ID = "DRRL-KVCache-v0"
KV_BASES = ("joint", "separate")
KV_BASELINES = ("none", "uniform", "uniform_log_ratio", "static", "static_log_ratio")


@dataclass(frozen=True)
class KVCacheConfig:
    """Every argument of DRRL-KVCache-v0 (``gym.make`` keywords), validated."""

    model: str = DEFAULT_MODEL
    """HF causal LM: the offline default, a local folder or a hub id"""
    corpus: str = DEFAULT_CORPUS
    """text the prompts come from (a name or a path)"""
    split: str = "train"
    """split of the corpus the prompt pool is drawn from"""
    context: int = 1024
    """prompt tokens"""
    prompts: int = 16
    """prompts in the pool: the first ``prompts`` chunks of ``context`` tokens of the split"""
    observe_tokens: int = 64
    """tokens the full model generates before the ranks are committed (their statistics are the observation)"""
    horizon: int = 64
    """tokens scored after the commit (the full model's own greedy continuation, teacher-forced)"""
    ranks: tuple[int, ...] = (16, 32, 48, 64)
    """candidate key-cache ranks (ascending; a rank equal to the head dimension keeps a layer's keys full)"""
    cache_budget: float | tuple[float, float] | None = 0.75
    """the episode's key-cache bytes as a share of the full key cache's (a (lo, hi) range: drawn per episode);
    None: no budget"""
    basis: str = "joint"
    """the key basis: 'joint' (the logits' Eckart-Young basis) or 'separate' (the keys' top singular vectors)"""
    sink_tokens: int = SINK_TOKENS
    """first tokens whose keys stay exact"""
    recent_tokens: int = RECENT_TOKENS
    """the window of last positions whose keys stay exact for every decode step"""
    cached_prompts: int = 4
    """prompts whose precomputed state is kept in memory (least recently used evicted)"""
    static_prior: bool = False
    """add the static prior to the observation: the layer's validation decode profile (log10 of its KL per
    candidate) and the static allocation's rank at the layer for the episode's budget (a share of the head
    dimension); computed once on validation text, so free per prompt"""
    attention_kl: bool = False
    """add the observed tokens' attention KL to the observation: per candidate, log10 of how far the layer's basis
    at the rank moves the attention distributions of 16 observed queries (observed_attention_kls; its FLOPs are
    counted in info['flops_observation'])"""
    kl_baseline: str = "none"
    """the terminal reward: 'none' (-KL), or paired with a fixed rule's KL on the same prompt and budget: 'uniform' /
    'static' (KL_b - KL, KL_b of uniform ranks / of the static decode allocation, the water-fill of the validation
    decode profile), 'uniform_log_ratio' / 'static_log_ratio' (log(KL_b / KL)); it costs one more scored
    continuation per new prompt and allocation"""
    device: str = "cpu"
    """torch device of the model ('cpu', 'cuda', 'auto')"""

    def __post_init__(self) -> None:
        for name in ("context", "prompts", "observe_tokens", "horizon", "cached_prompts"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.horizon < 2:
            raise ValueError(f"horizon must be an integer >= 2, got {self.horizon!r}")
        for name in ("sink_tokens", "recent_tokens"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        ranks = self.ranks
        if isinstance(ranks, (str, bytes)) or not hasattr(ranks, "__len__") or len(ranks) == 0:
            raise ValueError(f"ranks must be a non-empty sequence of integers >= 1, got {ranks!r}")
        for rank in ranks:
            if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank < 1:
                raise ValueError(f"ranks must be integers >= 1, got entry {rank!r}")
        object.__setattr__(self, "ranks", tuple(sorted({int(r) for r in ranks})))
        if self.basis not in KV_BASES:
            raise ValueError(f"basis must be one of {KV_BASES}, got {self.basis!r}")
        if self.kl_baseline not in KV_BASELINES:
            raise ValueError(f"kl_baseline must be one of {KV_BASELINES}, got {self.kl_baseline!r}")
        budget = self.cache_budget
        if budget is not None:
            bounds = (budget, budget) if not isinstance(budget, (tuple, list)) else tuple(budget)
            real = all(isinstance(b, (int, float, np.number)) and not isinstance(b, bool) for b in bounds)
            if len(bounds) != 2 or not real or not all(math.isfinite(b) and 0 < b <= 1 for b in bounds):
                raise ValueError(f"cache_budget must be None, a share in (0, 1] or a (lo, hi) range, got {budget!r}")
            if bounds[0] > bounds[1]:
                raise ValueError(f"cache_budget range must have lo <= hi, got {budget!r}")
            object.__setattr__(self, "cache_budget", (float(bounds[0]), float(bounds[1])))
        for name in ("static_prior", "attention_kl"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("model", "corpus", "split", "device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> KVCacheConfig:
        """Build from ``gym.make`` keywords; unknown keywords get an error listing the valid ones."""
        names = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(f"{KVCACHE_ENV_ID} got unknown argument(s) {unknown}; valid arguments: {names}")
        return cls(**kwargs)


@dataclass
class PromptState:
    """What every episode on one prompt shares, computed once (module docstring, "Cheap episodes").

    Attributes:
        prefix: ``(1, context + observe_tokens)`` the prompt and the observed tokens.
        continuation: ``(1, horizon)`` the full model's greedy continuation after the prefix (the scored tokens).
        reference: ``(1, horizon, V)`` the full model's next-token logits of the scored tokens.
        caches: per candidate rank (and the head dimension: full keys), the key cache after the prefix with every
            layer at it.
        first_logits: ``(1, 1, V)`` the next-token logits after the prefix (attended exactly: the same at every rank).
        layer_bytes: ``(L, K)`` key bytes of each layer's cache at each candidate after the prefix;
            ``full_layer_bytes`` ``(L,)`` at full width.
        observed_errors, prompt_errors: ``(L, K)`` relative logit errors (the observation's statistics).
        seconds: wall-clock of the precomputation; ``seconds_observation``: of its statistics alone.
    """

    prefix: torch.Tensor
    continuation: torch.Tensor
    reference: torch.Tensor
    caches: dict[int, LowRankKeyCache]
    first_logits: torch.Tensor
    layer_bytes: np.ndarray
    full_layer_bytes: np.ndarray
    observed_errors: np.ndarray
    prompt_errors: np.ndarray
    seconds: float
    seconds_observation: float
    kls: dict[tuple[int, ...], float] = dataclasses.field(default_factory=dict)
    """the KL of every allocation scored on this prompt so far (an episode that repeats one scores nothing new)"""
    attention_kls: np.ndarray | None = None
    """``(L, K)`` the observed tokens' attention KL, computed the first time an env or a rule asks for it"""


_shared_states: dict[tuple, PromptState] | None = None
"""the prompt states every env of the process shares inside a :func:`shared_prompt_states` block (else None)"""


@contextlib.contextmanager
def shared_prompt_states() -> Iterator[None]:
    """Within the block, the DRRL-KVCache-v0 envs of this process share the states of equal prompts.

    An env that needs a prompt's state takes it from the block's store if an env with the same model, device and
    state settings (``observe_tokens``, ``horizon``, ``ranks``, ``basis``, ``sink_tokens``, ``recent_tokens``)
    computed it for the same tokens, and leaves the states it computes there. The store keeps every state until
    the block ends (hundreds of MB each at context 1024: one block per pool of prompts); a nested block uses the
    outer one's store. Envs in other processes (``SubprocVecEnv``, RLlib's workers) share nothing.
    """
    global _shared_states
    outer = _shared_states
    if outer is None:
        _shared_states = {}
    try:
        yield
    finally:
        if outer is None:
            _shared_states = None


def layer_key_bytes(cache: LowRankKeyCache) -> list[int]:
    """Key bytes of each layer of ``cache`` (sink and recent keys included: :func:`layer_bytes`)."""
    return [layer_bytes(layer)["keys"] for layer in cache.layers]


@torch.no_grad()
def prompt_state(loaded: LoadedModel, prompt: torch.Tensor, config: KVCacheConfig) -> PromptState:
    """:class:`PromptState` of ``prompt`` ``(1, context)`` under ``config``."""
    started = time.perf_counter()
    generated = greedy_continuation(loaded, prompt, config.observe_tokens + config.horizon)  # (1, T_o + T_h)
    prefix = torch.cat([prompt.cpu(), generated[:, : config.observe_tokens]], dim=1)
    continuation = generated[:, config.observe_tokens :]
    shape = loaded.attention_shape
    options = {"sink_tokens": config.sink_tokens, "recent_tokens": config.recent_tokens}
    caches: dict[int, LowRankKeyCache] = {}
    for rank in sorted(set(config.ranks) | {shape.head_dim}):  # the full cache too: the reference
        caches[rank], _, first_logits = prefilled(loaded, prefix, min(rank, shape.head_dim), config.basis, options)
    # the prefix is attended exactly: the logits after it are the full model's at every rank (the last: full keys)
    reference = scored_logits(loaded, config, caches, first_logits, continuation, [shape.head_dim] * shape.num_layers)
    observed = time.perf_counter()
    observed_errors = prefill_logit_errors(loaded, prefix, config.ranks, config.observe_tokens, config.basis)
    prompt_errors = prefill_logit_errors(loaded, prompt, config.ranks, config.observe_tokens, config.basis)
    seconds_observation = time.perf_counter() - observed
    return PromptState(
        prefix, continuation, reference, caches, first_logits,
        np.array([layer_key_bytes(caches[rank]) for rank in config.ranks]).T,  # (L, K)
        np.array(layer_key_bytes(caches[shape.head_dim])),  # (L,)
        observed_errors, prompt_errors, time.perf_counter() - started, seconds_observation,
    )  # fmt: skip


def scored_logits(
    loaded: LoadedModel,
    config: KVCacheConfig,
    caches: dict[int, LowRankKeyCache],
    first_logits: torch.Tensor,
    continuation: torch.Tensor,
    plan: list[int],
) -> torch.Tensor:
    """``(1, horizon, V)`` next-token logits of ``continuation`` through the cache of ``plan`` (a rank per layer).

    Layer ``l``'s cache is the prefix's cache at ``plan[l]`` (``continued_logits`` reads shallow copies: the kept
    caches stay as they were).
    """
    shape = loaded.attention_shape
    layers = [caches[int(rank)].layers[layer] for layer, rank in enumerate(plan)]
    table = rank_table([min(int(rank), shape.head_dim) for rank in plan], shape)
    handler = KeyBasisAttention(table, config.basis, None, None, config.sink_tokens, config.recent_tokens)
    return continued_logits(loaded, layers, handler, continuation, first_logits)


def episode_logits(loaded: LoadedModel, config: KVCacheConfig, state: PromptState, plan: list[int]) -> torch.Tensor:
    """:func:`scored_logits` of ``state``'s scored tokens through the cache of ``plan``."""
    return scored_logits(loaded, config, state.caches, state.first_logits, state.continuation, plan)


@dataclass
class KeyCacheBudget:
    """An episode's budget on key-cache bytes, enforced through the mask (as ``drrl_env.guardrail.FlopsBudget``).

    ``costs`` ``(L, K)`` are the key bytes of each layer at each candidate, ``full`` the full key cache's bytes.
    A candidate at layer ``l`` is allowed only if the episode can still end within ``share * full`` with every
    later layer at its cheapest candidate, so every episode ends at or under budget, whatever the policy does.
    """

    costs: np.ndarray
    full: int
    share: float
    spent: int = 0

    def __post_init__(self) -> None:
        cheapest = int(self.costs.min(axis=1).sum())
        if Fraction(self.share) * self.full < cheapest:
            raise ValueError(
                f"cache_budget {self.share} is below the smallest candidates' share of the key cache "
                f"({cheapest / self.full:.4f}): no episode could meet it"
            )

    def mask(self, layer: int) -> np.ndarray:
        """``(K,)``: True where the candidate keeps the episode within budget."""
        later = int(self.costs[layer + 1 :].min(axis=1).sum())
        allowance = Fraction(self.share) * self.full
        return np.array([self.spent + int(cost) + later <= allowance for cost in self.costs[layer]])

    def used_share(self) -> float:
        return self.spent / self.full

    def left_share(self, layer: int) -> float:
        """Budget left over the full bytes of the layers from ``layer`` on (the mean share the rest may use)."""
        full_rest = self.full * (len(self.costs) - layer) / len(self.costs)
        return float((self.share * self.full - self.spent) / full_rest) if full_rest else 0.0


OBSERVATION_CLIP = 10.0
STATIC_PRIOR_FLOOR = 1e-7
"""added to the validation profile's KL before its log10 in the static prior (a rank at the head dimension costs 0)"""
ATTENTION_KL_FLOOR = 1e-7
"""added to the attention KL before its log10 in the observation"""


def observation_size(candidates: int, static_prior: bool, attention_kl: bool = False) -> int:
    """The observation's length with ``candidates`` ranks: ``2K + 5``, ``+ K + 1`` prior, ``+ K`` attention KL."""
    return 2 * candidates + 5 + (candidates + 1 if static_prior else 0) + (candidates if attention_kl else 0)


class DRRLKVCacheEnv(gym.Env[np.ndarray, int]):
    """DRRL-KVCache-v0 (module docstring). ``action_masks()`` is the budget's mask (sb3-contrib's convention).

    Observation (float32, clipped to ``[-10, 10]``): the observed tokens' relative logit error at each candidate
    (K), the prompt's last queries' (K), depth ``l / (L - 1)``, the budget and the budget left (2), and the mean
    and last rank chosen so far as shares of the head dimension (2); with ``static_prior``, also the layer's
    validation decode profile (``log10(KL + 1e-7)``, K) and the static allocation's rank share at the layer (1);
    with ``attention_kl``, also the observed tokens' attention KL at each candidate (``log10(KL + 1e-7)``, K:
    :meth:`observed_attention_kls`). Action: ``Discrete(K)``, the candidate index.
    """

    metadata = {"render_modes": []}

    def __init__(self, **kwargs: Any) -> None:
        self.config = KVCacheConfig.from_kwargs(kwargs)
        cfg = self.config
        self.device = resolve_device(cfg.device)
        self.loaded = load_causal_lm(cfg.model, device=str(self.device))
        self.loaded.check_length(cfg.context + cfg.observe_tokens + cfg.horizon, "context + observe_tokens + horizon")
        shape = self.loaded.attention_shape
        self.num_layers, self.head_dim = shape.num_layers, shape.head_dim
        if max(cfg.ranks) > self.head_dim:
            raise ValueError(f"ranks must not exceed the model's head_dim ({self.head_dim}), got {list(cfg.ranks)}")
        tokens = corpus_tokens(cfg.corpus, cfg.split, self.loaded.tokenizer)
        self.prompts = sequential_chunks(tokens, cfg.context, cfg.prompts * cfg.context)
        if len(self.prompts) < cfg.prompts:
            held = len(self.prompts)
            raise ValueError(f"prompts={cfg.prompts}: the {cfg.split} split holds only {held} of {cfg.context} tokens")
        size = observation_size(len(cfg.ranks), cfg.static_prior, cfg.attention_kl)
        self.observation_space = spaces.Box(-OBSERVATION_CLIP, OBSERVATION_CLIP, (size,), np.float32)
        self.action_space = spaces.Discrete(len(cfg.ranks))
        self._states: OrderedDict[int, PromptState] = OrderedDict()
        self._state: PromptState | None = None
        self._budget: KeyCacheBudget | None = None
        self._static_plan: list[int] | None = None
        self._plan: list[int] = []
        self.prefills = 0
        """prompts precomputed so far (an episode on a kept prompt adds none)"""

    # ----------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        """Start an episode.

        ``options``: ``prompt`` (an index into the pool instead of a drawn one), ``input_ids`` (a prompt of one's
        own, ``(1, n)`` or ``(n,)`` token ids, ``n >= 2``: its state is computed for this episode and not kept in
        the pool's cache; ``info["prompt"]`` is then -1), ``budget`` (this episode's key-cache share instead of a
        drawn one; needs ``cache_budget``).
        """
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = sorted(set(options) - {"prompt", "budget", "input_ids"})
        if unknown:
            raise ValueError(f"reset options must be 'prompt', 'input_ids' or 'budget', got {unknown}")
        if "prompt" in options and "input_ids" in options:
            raise ValueError("reset options 'prompt' and 'input_ids' exclude each other")
        cfg = self.config
        episode_seed = int(self.np_random.integers(2**63))  # draws the prompt and the budget (a record replays it)
        rng = np.random.default_rng(episode_seed)
        index = int(rng.integers(cfg.prompts))
        share = 1.0
        if cfg.cache_budget is not None:
            lo, hi = cfg.cache_budget
            share = lo if lo == hi else float(rng.uniform(lo, hi))
        if "prompt" in options:
            index = options["prompt"]
            if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or not 0 <= index < cfg.prompts:
                raise ValueError(f"reset option prompt must be an index in [0, {cfg.prompts}), got {index!r}")
            index = int(index)
        if "budget" in options:
            share = options["budget"]
            if cfg.cache_budget is None or not isinstance(share, (int, float, np.number)) or not 0 < share <= 1:
                raise ValueError(
                    f"reset option budget must be a share in (0, 1] of an env with a cache_budget, got {share!r}"
                )
            share = float(share)
        if "input_ids" in options:
            self._state, index = self._own_prompt(options["input_ids"]), -1
        else:
            self._state = self._prompt(index)
        self._budget = KeyCacheBudget(self._state.layer_bytes, int(self._state.full_layer_bytes.sum()), share)
        self._plan, self._index, self._steps, self._final = [], index, [], {}
        self._episode_seed = episode_seed
        static = cfg.static_prior or cfg.kl_baseline.startswith("static")  # the static allocation, once per episode
        self._static_plan = self.waterfill_plan(self.static_profile()) if static else None
        return self._observation(), {
            "episode_seed": episode_seed,
            "prompt": index,
            "budget": share,
            "action_mask": self.action_masks(),
            "flops_observation": self.observation_flops(),
            "seconds_observation": self._state.seconds_observation,
        }

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._state is None or len(self._plan) == self.num_layers:
            raise RuntimeError(
                f"{KVCACHE_ENV_ID}: call reset() before step() (the episode has not started or has ended)"
            )
        if isinstance(action, np.ndarray) and action.size == 1:
            action = action.reshape(()).item()
        if (
            not isinstance(action, (int, np.integer))
            or isinstance(action, bool)
            or not 0 <= action < len(self.config.ranks)
        ):
            raise ValueError(f"action must be an integer in [0, {len(self.config.ranks)}), got {action!r}")
        layer, mask = len(self._plan), self.action_masks()
        chosen = int(action) if mask[action] else int(np.flatnonzero(mask).max())  # the largest allowed below
        self._budget.spent += int(self._state.layer_bytes[layer, chosen])
        self._plan.append(self.config.ranks[chosen])
        info: dict[str, Any] = {
            "layer": layer, "rank": self.config.ranks[chosen], "masked_violation": not bool(mask[action]),
            "budget": self._budget.share, "budget_used": self._budget.used_share(),
        }  # fmt: skip
        terminated = len(self._plan) == self.num_layers
        reward = 0.0
        if terminated:
            info["kl"] = self._kl(self._plan)
            info["ranks"] = list(self._plan)
            baseline = self.config.kl_baseline
            if baseline != "none":
                rule = self.uniform_plan() if baseline.startswith("uniform") else self._static_plan
                info["kl_baseline"] = self._kl([self.config.ranks[index] for index in rule])
            paired = {"static": "reference", "static_log_ratio": "reference_log_ratio"}.get(baseline, baseline)
            reward = kl_terminal_reward(info["kl"], info.get("kl_baseline"), paired)
            self._final = {"budget_used": info["budget_used"], "kl": info["kl"]}
            info["action_mask"] = np.zeros(len(self.config.ranks), dtype=bool)
            observation = np.zeros(self.observation_space.shape, np.float32)
        else:
            info["action_mask"] = self.action_masks()
            observation = self._observation()
        info["reward_terms"] = {"terminal": reward}
        step = {"action": [int(action)], "rank": info["rank"], "reward": reward, "reward_terms": {"terminal": reward}}
        self._steps.append(step)
        return observation, reward, terminated, False, info

    def episode_record(self) -> dict[str, Any]:
        """What reproduces the current (or last) episode, JSON-ready (``drrl_env.replay``).

        The config, the prompt and budget, each step's action, rank and reward, and at the end the budget used and
        the KL.
        """
        self._started("episode_record()")
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.config).items()}
        return {
            "version": 1, "env_id": KVCACHE_ENV_ID, "config": config, "episode_seed": self._episode_seed,
            "guardrail_step": 0, "prompt": self._index, "budget": self._budget.share, "steps": list(self._steps),
            "terminated": bool(self._final), **self._final,
            **({"input_ids": self.prompt_ids[0].tolist()} if self._index < 0 else {}),
        }  # fmt: skip

    @property
    def layer(self) -> int:
        """The layer the next step decides (``num_layers`` once the episode has ended)."""
        return len(self._plan)

    @property
    def prompt_index(self) -> int:
        """The current episode's prompt: its index in the pool (``reset(options={"prompt": ...})``)."""
        self._started("prompt_index")
        return self._index

    @property
    def prompt_ids(self) -> torch.Tensor:
        """``(1, n)`` the current episode's prompt (without the observed tokens)."""
        return self.current_prompt.prefix[:, : -self.config.observe_tokens]

    @property
    def budget_share(self) -> float:
        """The current episode's key-cache budget as a share of the full key cache's bytes (1 without a budget)."""
        self._started("budget_share")
        return self._budget.share

    @property
    def current_prompt(self) -> PromptState:
        """The current episode's prompt state (what every episode on the prompt shares)."""
        self._started("current_prompt")
        return self._state

    @property
    def num_segments(self) -> int:
        """One step per layer (``drrl_env.replay`` counts ``num_layers * num_segments`` steps)."""
        return 1

    def action_masks(self) -> np.ndarray:
        """``(K,)``: the candidates the budget allows at the current layer."""
        if self._budget is None or len(self._plan) == self.num_layers:
            raise RuntimeError(f"{KVCACHE_ENV_ID}: call reset() before action_masks()")
        return self._budget.mask(len(self._plan))

    def byte_shares(self) -> np.ndarray:
        """``(K,)`` a layer's key bytes at each candidate over its full key bytes, on the current prompt (mean)."""
        state = self.current_prompt
        return (state.layer_bytes / state.full_layer_bytes[:, None]).mean(axis=0)

    def waterfill_plan(self, profile: np.ndarray) -> list[int]:
        """The water-fill of ``profile`` ``(L, K)`` at the episode's budget: a candidate index per layer."""
        return [int(index) for index in allocate_ranks(profile, self.byte_shares(), self.budget_share)]

    def uniform_plan(self) -> list[int]:
        """Every layer at the largest candidate whose key-byte share fits the episode's budget."""
        fitting = np.flatnonzero(self.byte_shares() <= self.budget_share + 1e-12)
        return [int(fitting.max()) if len(fitting) else 0] * self.num_layers

    def static_profile(self, progress: bool = False) -> np.ndarray:
        """``(L, K)`` the validation decode profile of the env's model and candidates (measured once, cached on disk).

        Its water-fill is the static decode allocation. The validation split of the env's corpus, or of the default
        corpus for an evaluation-only one (news, shakespeare): chosen on text other than the prompts'.
        """
        cfg = self.config
        corpus = DEFAULT_CORPUS if cfg.corpus in EVALUATION_ONLY else cfg.corpus
        max_tokens = cfg.context * DECODE_PROFILE_PROMPTS
        cost, _ = validation_profile(
            cfg.model, corpus, cfg.context, None, cfg.ranks, cfg.basis, cfg.device, max_tokens, progress, "decode"
        )
        return cost

    def observation_flops(self) -> float:
        """FLOPs of the observation's statistics beyond the generation's own work, per episode (an estimate).

        The prefix's key and query Grams are the basis's, which the compressed cache computes anyway. Beyond
        them, per layer and key/value group: the ``d x d`` Grams of the observed tokens' queries and of the prompt's
        last ones (``2 d^2`` per query row), one decomposition of the basis shared by every candidate (about
        ``10 d^3``), and per candidate the error's ``d x d`` products (about ``4 d^3``). An estimate of the work the
        statistics need, not of this implementation, which computes them outside the generation in extra passes.
        """
        shape, cfg = self.loaded.attention_shape, self.config
        rows = 2 * cfg.observe_tokens * (shape.q_heads // shape.kv_heads)
        d = shape.head_dim
        per_group = 2 * d**2 * rows + 10 * d**3 + len(cfg.ranks) * 4 * d**3
        errors = float(shape.num_layers * shape.kv_heads * per_group)
        return errors + (self.attention_kl_flops() if cfg.attention_kl else 0.0)

    def observed_attention_kls(self) -> np.ndarray:
        """``(L, K)`` the current prompt's observed tokens' attention KL at each candidate, computed once per prompt.

        :func:`drrl_env.generation.decode_profile.observed_attention_kls` over ``ATTENTION_KL_QUERIES`` observed
        queries, with the cache's basis, sinks and recent window.
        """
        self._started("observed_attention_kls()")
        state, cfg = self._state, self.config
        if state.attention_kls is None:
            state.attention_kls = observed_attention_kls(
                self.loaded, state.prefix, cfg.ranks, cfg.observe_tokens, cfg.basis,
                sink_tokens=cfg.sink_tokens, recent_tokens=cfg.recent_tokens, queries=ATTENTION_KL_QUERIES,
            )  # fmt: skip
        return state.attention_kls

    def attention_kl_flops(self) -> float:
        """FLOPs of :meth:`observed_attention_kls` beyond the generation's own work, per prompt (an estimate).

        Per layer and key/value group: the basis' decomposition (about ``10 d^3``; its Grams are the cache's own),
        the scored queries' exact logits (``2 G q n d``), and per candidate below the head dimension the maps
        (``4 d^3``), the keys through them (``2 n d r``), the queries' low-rank logits and their softmax
        (``2 G q (d + n) r + 5 G q n``); ``q`` scored queries per head, ``n`` keys.
        """
        cfg, shape = self.config, self.loaded.attention_shape
        d, n = shape.head_dim, cfg.context + cfg.observe_tokens
        gq = shape.q_heads // shape.kv_heads * min(ATTENTION_KL_QUERIES, cfg.observe_tokens)
        per_rank = [4 * d**3 + 2 * n * d * r + 2 * gq * (d + n) * r + 5 * gq * n for r in cfg.ranks if r < d]
        return float(shape.num_layers * shape.kv_heads * (10 * d**3 + 2 * gq * n * d + sum(per_rank)))

    def close(self) -> None:
        """Drop the kept prompts' states (their caches and logits: hundreds of MB each at context 1024)."""
        self._states.clear()
        self._state = None
        super().close()

    # ----------------------------------------------------------------- internals
    def _started(self, what: str) -> None:
        """Raise the one error of every use of an episode's state before the first ``reset()``."""
        if self._state is None or self._budget is None:
            raise RuntimeError(f"{KVCACHE_ENV_ID}: call reset() before {what}")

    def _prompt(self, index: int) -> PromptState:
        """The prompt's state, from the kept ones or computed (evicting the least recently used)."""
        if index in self._states:
            self._states.move_to_end(index)
            return self._states[index]
        prompt = self.prompts[index : index + 1]
        key = self._shared_key(prompt)
        state = None if _shared_states is None else _shared_states.get(key)
        if state is None:
            state = prompt_state(self.loaded, prompt.to(self.device), self.config)
            self.prefills += 1
            if _shared_states is not None:
                _shared_states[key] = state
        self._states[index] = state
        while len(self._states) > self.config.cached_prompts:
            self._states.popitem(last=False)
        return state

    def _shared_key(self, prompt: torch.Tensor) -> tuple:
        """What makes two envs' states of ``prompt`` equal (:func:`shared_prompt_states`)."""
        cfg = self.config
        tokens = hashlib.sha256(prompt.cpu().numpy().tobytes()).hexdigest()
        settings = (cfg.observe_tokens, cfg.horizon, tuple(cfg.ranks), cfg.basis, cfg.sink_tokens, cfg.recent_tokens)
        return (cfg.model, str(self.device), str(self.loaded.model.dtype), *settings, tokens)

    def _kl(self, plan: list[int]) -> float:
        """The KL per scored token of the current prompt through the cache of ``plan`` (ranks), kept per prompt."""
        key = tuple(int(rank) for rank in plan)
        kls = self._state.kls
        if key not in kls:
            kls[key] = next_token_kl(self._state.reference, episode_logits(self.loaded, self.config, self._state, plan))
        return kls[key]

    def _own_prompt(self, input_ids: Any) -> PromptState:
        """The state of a prompt given as token ids (``reset(options={"input_ids": ...})``), not kept."""
        ids = torch.as_tensor(np.asarray(input_ids))
        if ids.dim() == 1:
            ids = ids[None]
        vocabulary = self.loaded.model.config.vocab_size
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 2 or ids.dtype.is_floating_point:
            raise ValueError(f"reset option input_ids must be (1, n) or (n,) token ids with n >= 2, got {input_ids!r}")
        if int(ids.min()) < 0 or int(ids.max()) >= vocabulary:
            raise ValueError(f"reset option input_ids must be token ids in [0, {vocabulary}), got {input_ids!r}")
        cfg = self.config
        length = ids.shape[1] + cfg.observe_tokens + cfg.horizon
        self.loaded.check_length(length, "input_ids + observe_tokens + horizon")
        return prompt_state(self.loaded, ids.long().to(self.device), cfg)

    def _observation(self) -> np.ndarray:
        layer, state, budget = len(self._plan), self._state, self._budget
        chosen = np.asarray(self._plan, dtype=np.float64) / self.head_dim
        parts = [
            state.observed_errors[layer],
            state.prompt_errors[layer],
            [layer / max(self.num_layers - 1, 1), budget.share, budget.left_share(layer)],
            [chosen.mean() if len(chosen) else 1.0, chosen[-1] if len(chosen) else 1.0],
        ]
        if self.config.static_prior:
            parts.append(np.log10(self.static_profile()[layer] + STATIC_PRIOR_FLOOR))
            parts.append([self.config.ranks[self._static_plan[layer]] / self.head_dim])
        if self.config.attention_kl:
            parts.append(np.log10(self.observed_attention_kls()[layer] + ATTENTION_KL_FLOOR))
        return np.clip(np.concatenate(parts), -OBSERVATION_CLIP, OBSERVATION_CLIP).astype(np.float32)
