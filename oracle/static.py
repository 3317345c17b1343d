"""Static per-layer rank allocation: the strongest baseline that does not adapt to the input.

It profiles, on validation text, the KL from the full model's next-token distribution that each
layer alone costs at each candidate rank (all other layers at full attention;
:func:`drrl_env.profiles.kl.layer_kl_profile`, label-free), averages the profile over the
validation batches, and spends a budget of logit FLOPs (the env's ``flops_budget`` unit: a layer
at rank ``r`` costs ``r / d``) by the marginal water-fill of :func:`drrl_env.profiles.waterfill.allocate_ranks`.
The hindsight oracle does the same on each input's own profile; an input-adaptive agent has to
beat this allocation (and uniform ranks) at equal FLOPs for adaptivity to mean anything.

The ``decode`` estimate profiles generation with a low-rank key cache instead of a prefill
(:func:`drrl_env.generation.decode_profile.decode_kl_profile`, basis = the env's spectral mode): the allocation
to use for ``python -m agents.generate`` (a prefill profile does not transfer there; measured).
Profiles are cached in memory and on disk (``$DRRL_CACHE_DIR/profiles``, written atomically).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from drrl_env.config import check_budget_share
from drrl_env.env import DRRLAttentionEnv, EnvConfig
from drrl_env.generation.decode_profile import DECODE_PROFILE_TOKENS, decode_kl_profile
from drrl_env.lm.corpora import DEFAULT_CORPUS, EVALUATION_ONLY, corpus_tokens, sequential_chunks
from drrl_env.lm.files import read_cache_entry, write_text_atomic
from drrl_env.lm.models import cache_file, load_causal_lm, resolve_device
from drrl_env.profiles.calibration import calibration_grams
from drrl_env.profiles.kl import PROFILE_ESTIMATES, kl_profile
from drrl_env.profiles.waterfill import allocate_ranks, rank_shares
from oracle.hindsight import LayerAllocationPolicy

PROFILE_BATCH = 4
"""validation sequences per profiling forward"""
STATIC_ESTIMATES = (*PROFILE_ESTIMATES, "decode")
"""how the validation profile is measured: a prefill's (exact, its Fisher estimate) or generation's (decode)"""
DECODE_PROFILE_PROMPTS = 4
"""at most this many validation prompts in a decode profile (one of 1024 tokens sufficed: docs/benchmarks.md)"""


class StaticAllocation(LayerAllocationPolicy):
    """One fixed candidate index per layer, whatever the input: the water-fill of a validation profile.

    ``budget`` is a share of full attention's logit FLOPs; None spends each episode's own budget
    (``env.budget_share``), as ``uniform`` does. ``estimate`` says how the profile was measured.
    """

    def __init__(
        self, budget: float | None, cost: np.ndarray, ranks: tuple[int, ...], head_dim: int, estimate: str = "exact"
    ) -> None:
        super().__init__()
        self.budget, self.estimate = budget, estimate
        self.cost = cost  # (L, K) mean per-token KL of each layer alone at each candidate rank, on validation text
        self.ranks, self.head_dim = ranks, head_dim
        self._allocations: dict[float, list[int]] = {}

    @property
    def name(self) -> str:
        budget = "" if self.budget is None else f":{self.budget:g}"
        return "static" + budget + ("" if self.estimate == "exact" else f":{self.estimate}")

    def allocation(self, budget: float) -> list[int]:
        """Candidate index per layer for ``budget`` (cached)."""
        if budget not in self._allocations:
            self._allocations[budget] = allocate_ranks(self.cost, rank_shares(self.ranks, self.head_dim), budget)
        return self._allocations[budget]

    def allocate(self, env: DRRLAttentionEnv) -> list[int]:
        budget = self.budget if self.budget is not None else env.budget_share
        return self.allocation(1.0 if budget is None else budget)

    @classmethod
    def profile(
        cls,
        budget: float | None,
        env_kwargs: dict,
        max_tokens: int = 2048,
        progress: bool = True,
        estimate: str = "exact",
    ) -> StaticAllocation:
        """Profile each layer's KL at each candidate rank on validation text; allocate ``budget`` (None: per episode).

        The validation split of the env's corpus is used, or of the default corpus for an
        evaluation-only corpus (news, shakespeare): the allocation is chosen on text other than
        the text it is evaluated on. ``max_tokens`` validation tokens are profiled (at least one sequence of
        ``seq_len``); the ``decode`` estimate profiles ``max_tokens // seq_len`` prompts of ``seq_len``
        (at least one, at most ``DECODE_PROFILE_PROMPTS``), each with a continuation of ``DECODE_PROFILE_TOKENS``.
        """
        if budget is not None:
            check_budget_share("budget", budget)
        if estimate not in STATIC_ESTIMATES:
            raise ValueError(f"profile estimate must be one of {STATIC_ESTIMATES}, got {estimate!r}")
        config = EnvConfig(**env_kwargs)
        max_tokens = max(max_tokens, config.seq_len)  # at least one sequence, however long
        corpus = DEFAULT_CORPUS if config.corpus in EVALUATION_ONLY else config.corpus
        args = (config.model, corpus, config.seq_len, config.segment_len, config.ranks, config.spectral_mode)
        cost, head_dim = validation_profile(*args, config.device, max_tokens, progress, estimate)
        return cls(budget, cost, config.ranks, head_dim, estimate)


@functools.cache
def validation_profile(
    model: str,
    corpus: str,
    seq_len: int,
    segment_len: int | None,
    ranks: tuple[int, ...],
    mode: str,
    device: str,
    max_tokens: int,
    progress: bool,
    estimate: str = "exact",
) -> tuple[np.ndarray, int]:
    """``(L, K)`` per-token KL of each layer alone at each rank, averaged over validation text; and the head dim.

    Read from the disk cache when this model, text and estimate were profiled before (any process).
    """
    key = {
        "model": model, "corpus": corpus, "seq_len": seq_len, "segment_len": segment_len, "ranks": list(ranks),
        "mode": mode, "max_tokens": max_tokens, "estimate": estimate, "version": 1,
    }  # fmt: skip
    if estimate == "decode":
        key |= {"decode_tokens": DECODE_PROFILE_TOKENS, "decode_prompts": DECODE_PROFILE_PROMPTS}
    path = cache_file("profiles", model, key, ".json")
    stored = read_cache_entry(path, _load_profile, "validation profile")
    if stored is not None and stored.get("key") == key:
        return np.asarray(stored["cost"], dtype=np.float64), int(stored["head_dim"])
    cost, head_dim = measure_validation_profile(key, device, progress)
    write_text_atomic(path, json.dumps({"key": key, "cost": cost.tolist(), "head_dim": head_dim}))
    return cost, head_dim


def _load_profile(path: Path) -> dict:
    """A cached profile, refused (``ValueError``) unless its cost is a finite, non-negative table."""
    stored = json.loads(path.read_text())
    cost = np.asarray(stored["cost"], dtype=np.float64)
    if cost.ndim < 2 or not np.isfinite(cost).all() or (cost < 0).any() or int(stored["head_dim"]) < 1:
        raise ValueError("not a finite, non-negative profile")
    return stored


def measure_validation_profile(key: dict, device: str, progress: bool) -> tuple[np.ndarray, int]:
    """:func:`validation_profile` measured for its cache ``key``: the prefill profile of every batch, or decode's."""
    model, corpus, seq_len, mode = key["model"], key["corpus"], key["seq_len"], key["mode"]
    ranks, max_tokens, estimate = tuple(key["ranks"]), key["max_tokens"], key["estimate"]
    loaded = load_causal_lm(model, device=str(resolve_device(device)))
    head_dim = loaded.attention_shape.head_dim
    chunks = sequential_chunks(corpus_tokens(corpus, "validation", loaded.tokenizer), seq_len, max_tokens)
    if estimate == "decode":
        calibration = calibration_grams(loaded) if mode == "calibrated" else None
        prompts = chunks[: min(DECODE_PROFILE_PROMPTS, max(1, max_tokens // seq_len))]
        cost = decode_kl_profile(loaded, prompts, ranks, basis=mode, calibration=calibration, progress=progress)
        return cost, head_dim
    batches = list(chunks.split(PROFILE_BATCH))
    total = np.zeros((loaded.attention_shape.num_layers, len(ranks)))
    for batch in tqdm(batches, desc="static allocation: validation KL profile", disable=not progress):
        total += kl_profile(loaded, batch, ranks, mode, key["segment_len"], estimate) * batch.shape[0]
    return total / chunks.shape[0], head_dim
