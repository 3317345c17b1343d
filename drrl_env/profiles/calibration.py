"""Calibrated key bases: Gram matrices of a model's post-RoPE queries and keys over calibration text.

For every layer and key/value head, :func:`collect_grams` sums ``Q_g^T Q_g`` over the ``G``
query heads of the group and ``K^T K`` over every position of every calibration chunk (float64).
The bases of any rank follow from these Grams (:func:`drrl_env.attention.kv_basis.basis_from_grams`), so
one calibration serves every rank and every rank policy. :func:`calibration_grams` computes them
once per (model, corpus, split, tokens, chunk length) and keeps them under
``$DRRL_CACHE_DIR/calibration`` as a safetensors file (written atomically), beside the cached model.
The default text is the wiki corpus' validation split: no test text is ever seen.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from drrl_env.attention.hook import AttentionCall, install
from drrl_env.attention.kv_basis import CalibrationGrams, group_grams
from drrl_env.lm.corpora import DEFAULT_CORPUS, corpus_tokens, sequential_chunks
from drrl_env.lm.files import read_cache_entry, write_atomic
from drrl_env.lm.models import LoadedModel, cache_file

CALIBRATION_SPLIT = "validation"
CALIBRATION_TOKENS = 16384
CALIBRATION_SEQ_LEN = 512
CALIBRATION_BATCH = 4


@torch.no_grad()
def collect_grams(loaded: LoadedModel, chunks: torch.Tensor, batch_size: int = CALIBRATION_BATCH) -> CalibrationGrams:
    """Sum the group Grams of every layer over ``chunks (N, n)`` with full attention (the model is unchanged)."""
    shape = loaded.attention_shape
    size = (shape.num_layers, shape.kv_heads, shape.head_dim, shape.head_dim)
    query_sum = torch.zeros(size, dtype=torch.float64)
    key_sum = torch.zeros(size, dtype=torch.float64)

    def accumulate(call: AttentionCall) -> torch.Tensor:
        gram_q, gram_k = group_grams(call.query.double(), call.key.double())
        query_sum[call.layer] += gram_q.sum(dim=0).cpu()
        key_sum[call.layer] += gram_k.sum(dim=0).cpu()
        return call.full()

    hook = install(loaded.model)
    with hook.use(accumulate):
        for start in range(0, chunks.shape[0], batch_size):
            loaded.model(input_ids=chunks[start : start + batch_size].to(loaded.device))
    return CalibrationGrams(query_sum, key_sum, {"chunks": str(chunks.shape[0]), "seq_len": str(chunks.shape[1])})


def calibration_path(loaded: LoadedModel, corpus: str, split: str, tokens: int, seq_len: int) -> Path:
    """Where the Grams of this model and text are kept: ``$DRRL_CACHE_DIR/calibration/<model>-<digest>.safetensors``."""
    key = [loaded.name, corpus, split, tokens, seq_len, str(loaded.model.dtype)]
    return cache_file("calibration", loaded.name, key, ".safetensors")


def calibration_source(loaded: LoadedModel, corpus: str, split: str, tokens: int, seq_len: int) -> dict[str, str]:
    """What a calibration was fitted on, as :attr:`CalibrationGrams.source` records it (safetensors metadata)."""
    return {"model": loaded.name, "corpus": corpus, "split": split, "tokens": str(tokens), "seq_len": str(seq_len)}


def _load_grams(path: Path) -> dict[str, torch.Tensor]:
    """Cached Grams, refused (``ValueError``) unless both are there, of one shape, and finite."""
    stored = load_file(path)
    query, key = stored["query"], stored["key"]
    if query.shape != key.shape or query.dim() != 4 or not (query.isfinite().all() and key.isfinite().all()):
        raise ValueError("the Grams are not two finite (L, Hkv, d, d) tensors")
    return stored


def calibration_grams(
    loaded: LoadedModel,
    corpus: str = DEFAULT_CORPUS,
    split: str = CALIBRATION_SPLIT,
    tokens: int = CALIBRATION_TOKENS,
    seq_len: int = CALIBRATION_SEQ_LEN,
) -> CalibrationGrams:
    """The calibration Grams of ``loaded`` on the first ``tokens`` tokens of ``corpus``/``split``, cached on disk.

    Raises:
        ValueError: the split has fewer than ``seq_len`` tokens.
    """
    path = calibration_path(loaded, corpus, split, tokens, seq_len)
    source = calibration_source(loaded, corpus, split, tokens, seq_len)
    stored = read_cache_entry(path, _load_grams, "calibration Grams")
    if stored is not None:
        return CalibrationGrams(stored["query"], stored["key"], source)
    chunks = sequential_chunks(corpus_tokens(corpus, split, loaded.tokenizer), seq_len, tokens)
    grams = collect_grams(loaded, chunks)
    source = {**source, "chunks": grams.source["chunks"]}
    write_atomic(path, lambda temporary: save_file({"query": grams.query, "key": grams.key}, temporary, source))
    return CalibrationGrams(grams.query, grams.key, source)


def attach_calibration(
    loaded: LoadedModel,
    corpus: str = DEFAULT_CORPUS,
    split: str = CALIBRATION_SPLIT,
    tokens: int = CALIBRATION_TOKENS,
    seq_len: int = CALIBRATION_SEQ_LEN,
) -> CalibrationGrams:
    """Put :func:`calibration_grams` of this text on ``loaded``'s attention hook (the ``calibrated`` spectral mode).

    Idempotent for the same text; a different text replaces the model's calibration.
    """
    hook = install(loaded.model)
    wanted = calibration_source(loaded, corpus, split, tokens, seq_len)
    current = hook.calibration
    if current is None or any(current.source.get(name) != value for name, value in wanted.items()):
        hook.calibration = calibration_grams(loaded, corpus, split, tokens, seq_len)
    return hook.calibration
