"""The validation profile: what each layer's rank costs on validation text, measured once and cached on disk.

The static allocations (``oracle.static`` for the prefill, ``oracle.kvcache``'s ``static`` and DRRL-KVCache-v0's
``static`` baseline for the key cache) water-fill it. A prefill profile averages the per-layer KL of
:func:`drrl_env.profiles.kl.kl_profile` over validation batches; the ``decode`` estimate profiles generation with a
low-rank key cache (:func:`drrl_env.generation.decode_profile.decode_kl_profile`). Profiles are cached in memory
and on disk (``$DRRL_CACHE_DIR/profiles``, written atomically, validated when read).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from drrl_env.generation.decode_profile import DECODE_PROFILE_TOKENS, decode_kl_profile
from drrl_env.lm.corpora import corpus_tokens, sequential_chunks
from drrl_env.lm.files import read_cache_entry, write_text_atomic
from drrl_env.lm.models import cache_file, load_causal_lm, resolve_device
from drrl_env.profiles.calibration import calibration_grams
from drrl_env.profiles.kl import kl_profile

PROFILE_BATCH = 4
"""validation sequences per profiling forward"""
DECODE_PROFILE_PROMPTS = 4
"""at most this many validation prompts in a decode profile (one of 1024 tokens sufficed: docs/benchmarks.md)"""


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
