"""The scaled output-delta estimate of the sensitivity profile: one forward pass per input, no backward.

Eq. F of :mod:`drrl_env.profiles.sensitivity` estimates what unit ``u`` (a layer, or a key/value group of one) at
candidate ``k`` costs on an input as ``1/2 E[(g_u . delta[u, k])^2]``, with ``g`` the gradient of the
log-likelihood of labels sampled from the model and ``delta`` the change of the unit's attention output.
If ``g`` is taken as independent of ``delta``, with a covariance that does not depend on the input,

    cost[u, k](x) ~= s[u, k] * ||delta[u, k](x)||^2 / tokens,
    s[u, k] = mean_val Fisher cost[u, k] / mean_val ||delta[u, k]||^2 / tokens,          (Eq. S)

where both means run over validation text. :func:`fit_delta_scale` fits ``s`` (the Fisher profile with
``samples`` label samples of every validation batch, and the delta energy of the same batches);
:func:`delta_scale` does it once per (model, candidates, mode, segments, sequence length, samples,
granularity) and keeps it under ``$DRRL_CACHE_DIR/delta_scale`` (written atomically); and
:func:`scaled_delta_profile` is the per-input estimate: the input's own delta energy
(:func:`drrl_env.profiles.sensitivity.delta_energy_profile`, one forward pass with every candidate's low-rank
output beside the full one) times the scale. The input enters only through its own truncation errors,
which it has anyway; its labels never. Measured per head on SmolLM2 (docs/findings.md): log-correlation
0.97-0.98 with each test input's 16-sample Fisher profile (0.92-0.97 for the validation profile alone),
at about a fifteenth of its wall-clock.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from drrl_env.lm.corpora import DEFAULT_CORPUS, corpus_tokens, sequential_chunks
from drrl_env.lm.files import read_cache_entry, write_atomic
from drrl_env.lm.models import LoadedModel, cache_file
from drrl_env.profiles.sensitivity import delta_energy_profile, fisher_kl_profile

SCALE_SPLIT = "validation"
SCALE_TOKENS = 2048
"""validation tokens the scale is fitted on (16 chunks of 128 tokens)"""
SCALE_BATCH = 4


def fit_delta_scale(
    loaded: LoadedModel,
    chunks: torch.Tensor,
    ranks: tuple[int, ...],
    mode: str,
    segment_len: int | None,
    samples: int,
    per_head: bool,
) -> np.ndarray:
    """Eq. S over ``chunks (N, n)``: ``(L, K)`` (``(L, Hkv, K)`` per head); 0 where the delta energy is 0."""
    fisher, energy = 0.0, 0.0
    batches = tqdm(chunks.split(SCALE_BATCH), desc="Eq. S scale: one-off fit on validation text (cached)", unit="batch")
    for batch in batches:
        rows = len(batch)  # both profiles are per token: weight each batch by its rows
        fisher = fisher + rows * fisher_kl_profile(loaded, batch, ranks, mode, segment_len, samples, per_head=per_head)
        energy = energy + rows * delta_energy_profile(loaded, batch, ranks, mode, segment_len, per_head=per_head)
    fisher, energy = np.asarray(fisher), np.asarray(energy)
    return np.divide(fisher, energy, out=np.zeros_like(fisher), where=energy > 0)


def _load_scale(path: Path) -> np.ndarray:
    """A cached scale, refused (``ValueError``) unless it is a finite, non-negative float array."""
    scale = np.load(path)
    if scale.dtype.kind != "f" or not np.isfinite(scale).all() or (scale < 0).any():
        raise ValueError("not a finite, non-negative float array")
    return scale


_LOADED_SCALES: dict[Path, np.ndarray] = {}
"""the scales this process has read or fitted, by cache file"""


def delta_scale(
    loaded: LoadedModel,
    ranks: tuple[int, ...],
    mode: str,
    segment_len: int | None,
    seq_len: int,
    samples: int,
    per_head: bool,
    corpus: str = DEFAULT_CORPUS,
    tokens: int | None = None,
) -> np.ndarray:
    """:func:`fit_delta_scale` on the first ``tokens`` validation tokens of ``corpus`` in chunks of ``seq_len``, cached.

    ``tokens`` defaults to ``SCALE_TOKENS``, read at the call.

    Raises:
        ValueError: the validation split has fewer than ``seq_len`` tokens.
    """
    tokens = SCALE_TOKENS if tokens is None else tokens
    key = [loaded.name, list(ranks), mode, segment_len, seq_len, samples, per_head, corpus, SCALE_SPLIT, tokens]
    path = cache_file("delta_scale", loaded.name, [*key, str(loaded.model.dtype)], ".npy")
    if path not in _LOADED_SCALES:  # read once per process: every scaled_delta reset asks for it
        scale = read_cache_entry(path, _load_scale, "Eq. S scale")
        if scale is None:
            chunks = sequential_chunks(corpus_tokens(corpus, SCALE_SPLIT, loaded.tokenizer), seq_len, tokens)
            scale = fit_delta_scale(loaded, chunks, ranks, mode, segment_len, samples, per_head)
            write_atomic(path, lambda temporary: np.save(temporary, scale))
        scale.setflags(write=False)
        _LOADED_SCALES[path] = scale
    return _LOADED_SCALES[path]


def scaled_delta_profile(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    ranks: tuple[int, ...],
    mode: str = "separate",
    segment_len: int | None = None,
    samples: int = 16,
    per_head: bool = False,
) -> np.ndarray:
    """The input's sensitivity profile by Eq. S: ``delta_scale * delta_energy_profile(input)``, label-free.

    Same shape and units as :func:`drrl_env.profiles.sensitivity.fisher_kl_profile` (KL per token); ``samples`` are
    those of the validation Fisher profile that fits the scale (none are drawn for the input).
    """
    scale = delta_scale(loaded, tuple(ranks), mode, segment_len, input_ids.shape[1], samples, per_head)
    return scale * delta_energy_profile(loaded, input_ids, ranks, mode, segment_len, per_head=per_head)


def estimated_profile(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    ranks: tuple[int, ...],
    mode: str,
    segment_len: int | None,
    estimate: str,
    samples: int,
    per_head: bool,
) -> np.ndarray:
    """The label-free sensitivity profile of ``input_ids``: ``estimate`` 'fisher' (Eq. F) or 'scaled_delta' (Eq. S)."""
    if estimate == "fisher":
        return fisher_kl_profile(loaded, input_ids, ranks, mode, segment_len, samples, per_head=per_head)
    if estimate == "scaled_delta":
        return scaled_delta_profile(loaded, input_ids, ranks, mode, segment_len, samples, per_head)
    raise ValueError(f"sensitivity estimate must be 'fisher' or 'scaled_delta', got {estimate!r}")
