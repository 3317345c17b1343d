"""What each layer's key-cache rank costs in decode: the layer profile of generation, not of a prefill.

In generation with a low-rank key cache (:mod:`drrl_env.generation.decode`) the prompt is attended exactly
and only the generated tokens' queries meet compressed keys, beyond each query's recent window. A
layer profile taken in a prefill, where every query is projected (``static``, ``static:fisher``),
does not transfer to that regime (measured in docs/benchmarks.md: at the same key cache its
allocation is worse than uniform ranks). :func:`decode_kl_profile` measures the regime itself:
for each layer ``l`` and candidate rank ``r``, the mean per-step KL(full || low rank) of the
next-token distribution over a teacher-forced continuation of ``T`` tokens (full attention's own
greedy continuation: no labels of the text), with layer ``l``'s keys alone at rank ``r`` and every
other layer's at full width.

It costs one prefill per candidate rank instead of one per cell: the prefill attends exactly, so
its hidden states, and every layer's cache, do not depend on the other layers' ranks. The prompt
is prefilled once at full width and once with every layer at ``r``; the cache of cell ``(l, r)``
takes layer ``l`` from the second and the rest from the first, and only the ``T - 1``
continuation tokens run per cell. The result equals the cell-by-cell measurement
(:func:`drrl_env.generation.decode.teacher_forced_logits` per cell; tested).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from drrl_env.attention.hook import AttentionCall, install
from drrl_env.attention.kv_basis import CalibrationGrams, basis_from_grams, group_grams
from drrl_env.generation.decode import cached_forward, generate, key_cache_attention, rank_table
from drrl_env.generation.kv_attention import (
    RECENT_TOKENS,
    SINK_TOKENS,
    KeyBasisAttention,
    find_sinks,
    key_validity,
    prompt_grams,
)
from drrl_env.generation.kv_cache import LowRankKeyCache
from drrl_env.lm.models import LoadedModel
from drrl_env.lm.scoring import next_token_kl

DECODE_PROFILE_TOKENS = 64
"""teacher-forced continuation tokens per profiled prompt (measured enough: docs/benchmarks.md)"""


def greedy_continuation(loaded: LoadedModel, prompt: torch.Tensor, tokens: int) -> torch.Tensor:
    """``(B, tokens)``: full attention's greedy continuation of ``prompt`` ``(B, n)``, exactly ``tokens`` long."""
    pad = {} if loaded.tokenizer is None else {"pad_token_id": loaded.tokenizer.eos_token_id}
    out = generate(loaded, prompt, "full", max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, **pad)
    return out[:, prompt.shape[1] :].cpu()


@torch.no_grad()
def decode_kl_profile(
    loaded: LoadedModel,
    prompts: torch.Tensor,
    ranks: Sequence[int],
    tokens: int = DECODE_PROFILE_TOKENS,
    basis: str = "joint",
    calibration: CalibrationGrams | None = None,
    sink_tokens: int = SINK_TOKENS,
    recent_tokens: int = RECENT_TOKENS,
    progress: bool = False,
) -> np.ndarray:
    """``(L, K)`` mean per-step KL of each layer alone at each candidate rank in decode (module docstring).

    Args:
        loaded: the model.
        prompts: ``(P, n)`` prompts (validation text), profiled one at a time and averaged.
        ranks: the ``K`` candidate ranks; a rank ``>= d`` costs 0.
        tokens: teacher-forced continuation tokens per prompt (at least 2).
        basis: the key basis (``separate``, ``joint`` or ``calibrated``); the prompt is attended exactly.
        calibration: the Grams of a ``calibrated`` basis (default:
            :func:`drrl_env.profiles.calibration.calibration_grams`).
        sink_tokens: first tokens of each prompt whose keys stay exact.
        recent_tokens: the window of last positions whose keys stay exact for each decode step.
        progress: show a progress bar over prompts and ranks.
    """
    if tokens < 2:
        raise ValueError(f"tokens (teacher-forced continuation per prompt) must be >= 2, got {tokens}")
    if prompts.dim() != 2 or prompts.shape[0] == 0:
        raise ValueError(f"prompts must be a non-empty (P, n) token tensor, got shape {tuple(prompts.shape)}")
    shape = loaded.attention_shape
    layers, head_dim = shape.num_layers, shape.head_dim
    below = sorted({int(rank) for rank in ranks if rank < head_dim})
    options = {"calibration": calibration, "sink_tokens": sink_tokens, "recent_tokens": recent_tokens}
    cost = np.zeros((layers, len(ranks)))
    bar = tqdm(total=prompts.shape[0] * len(below), desc="decode KL profile", disable=not progress)
    for prompt in prompts:
        prompt = prompt[None]
        continuation = greedy_continuation(loaded, prompt, tokens)
        full_cache, full_handler, first = prefilled(loaded, prompt, "full", basis, options)
        reference = continued_logits(loaded, full_cache.layers, full_handler, continuation, first)
        for rank in below:
            low_cache, low_handler, _ = prefilled(loaded, prompt, rank, basis, options)
            for layer in range(layers):
                table = torch.full((layers,), head_dim)
                table[layer] = rank
                handler = KeyBasisAttention(
                    rank_table(table, shape), basis, low_handler.calibrated, None, sink_tokens, recent_tokens
                )
                cache_layers = [(low_cache if j == layer else full_cache).layers[j] for j in range(layers)]
                kl = next_token_kl(reference, continued_logits(loaded, cache_layers, handler, continuation, first))
                cost[layer, ranks.index(rank)] += kl / prompts.shape[0]
            bar.update()
    bar.close()
    return cost


def continued_logits(
    loaded: LoadedModel,
    cache_layers: list,
    handler: KeyBasisAttention,
    continuation: torch.Tensor,
    first: torch.Tensor,
) -> torch.Tensor:
    """``(1, T, V)`` logits of the continuation read through a cache of (copies of) ``cache_layers`` after the prefill.

    The copies are shallow: a layer's update rebinds its tensors, so the prefilled layers stay as they were.
    """
    cache = LowRankKeyCache(len(cache_layers))
    cache.layers = [copy.copy(layer) for layer in cache_layers]
    handler.cache = cache
    return torch.cat([first, cached_forward(loaded, handler, cache, continuation[:, :-1])], dim=1)


def prefilled(
    loaded: LoadedModel, prompt: torch.Tensor, ranks: str | int, basis: str, options: dict
) -> tuple[LowRankKeyCache, KeyBasisAttention, torch.Tensor]:
    """The key cache after an exact prefill of ``prompt`` with every layer at ``ranks``, its handler, last logits."""
    cache, handler = key_cache_attention(loaded, ranks, basis, exact_prefill=True, **options)
    return cache, handler, cached_forward(loaded, handler, cache, prompt)[:, -1:]


@torch.no_grad()
def prefill_logit_errors(
    loaded: LoadedModel,
    prompt: torch.Tensor,
    ranks: Sequence[int],
    window: int | None = 64,
    basis: str = "joint",
    sink_tokens: int = SINK_TOKENS,
) -> np.ndarray:
    """``(L, K)`` relative logit error of the prompt's last ``window`` queries with each layer's key basis at each rank.

    What one exact prefill of ``prompt`` ``(1, n)`` computes anyway: per layer, the key basis
    generation builds from the whole prompt (``basis``: ``joint`` or ``separate``; sinks exact
    and left out), and for the last ``window`` queries ``Q_w`` (those nearest the decode steps)
    ``||Q_w (I - W_q W_k^T) K^T||_F^2 / ||Q_w K^T||_F^2`` summed over key/value groups, at each
    candidate rank (0 at ranks ``>= d``). With ``M = I - W_q W_k^T`` the numerator is
    ``tr(M G_k M^T G_w)`` of the ``d x d`` Grams of the keys and of the window's queries.
    ``window=None`` takes every query (the in-sample error of the basis).
    """
    if prompt.dim() != 2 or prompt.shape[0] != 1:
        raise ValueError(f"prompt must be one (1, n) token row, got shape {tuple(prompt.shape)}")
    if window is not None and window < 1:
        raise ValueError(f"window must be None or >= 1, got {window}")
    shape = loaded.attention_shape
    errors = np.zeros((shape.num_layers, len(ranks)))

    def handler(call: AttentionCall) -> torch.Tensor:
        valid = key_validity(call)
        query, key = call.query.double(), call.key.double()
        gram_q, gram_k = prompt_grams(query, key, valid, find_sinks(call.key, valid, sink_tokens))
        gram_w = gram_q if window is None else group_grams(query[..., -window:, :], key[..., -window:, :])[0]
        total = torch.einsum("bhij,bhji->", gram_k, gram_w)
        for k, rank in enumerate(ranks):
            if rank >= shape.head_dim:
                continue
            maps = basis_from_grams(gram_q, gram_k, torch.full((shape.kv_heads,), int(rank)), basis)
            residual = torch.eye(shape.head_dim, dtype=torch.float64) - maps.query_map @ maps.key_map.transpose(-1, -2)
            error = torch.einsum("bhij,bhjk,bhlk,bhli->", residual, gram_k, residual, gram_w)
            errors[call.layer, k] = float(error / total)
        return call.full()

    with install(loaded.model).use(handler):
        loaded.model(input_ids=prompt.to(loaded.device))
    return errors


ATTENTION_KL_QUERIES = 16
"""observed queries per layer and head whose attention KL DRRL-KVCache-v0's ``attention_kl`` scores"""


def observed_attention_kls(
    loaded: LoadedModel,
    prefix: torch.Tensor,
    ranks: Sequence[int],
    observed: int,
    basis: str = "joint",
    sink_tokens: int = SINK_TOKENS,
    recent_tokens: int = RECENT_TOKENS,
    queries: int = ATTENTION_KL_QUERIES,
) -> np.ndarray:
    """``(L, K)`` how far each layer's key basis at each rank moves the observed tokens' attention distributions.

    ``prefix`` ``(1, n)`` is the prompt followed by its ``observed`` generated tokens, prefilled exactly once. Per
    layer the key basis is the one the compressed cache builds from the whole prefix (``basis``; sinks exact and
    left out), and for ``queries`` of the observed positions (evenly spaced, the last included) the value is
    ``KL(softmax(s) || softmax(s'))`` of the query's attention over the keys before it, ``s`` the exact logits and
    ``s'`` those through the basis at the rank, exact at the sinks and in the query's window of ``recent_tokens``
    (as decode scores them), averaged over the queries and query heads (0 at ranks ``>= d``). Unlike the relative
    logit error (:func:`prefill_logit_errors`), which weighs every key alike, it weighs each key by the attention it
    gets: the distortion the layer's attention output sees.
    """
    if prefix.dim() != 2 or prefix.shape[0] != 1:
        raise ValueError(f"prefix must be one (1, n) token row, got shape {tuple(prefix.shape)}")
    if not 1 <= observed < prefix.shape[1] or queries < 1:
        raise ValueError(f"observed must be in [1, n) and queries >= 1, got {observed} and {queries}")
    shape = loaded.attention_shape
    kls = np.zeros((shape.num_layers, len(ranks)))
    n = prefix.shape[1]
    positions = torch.linspace(n - observed, n - 1, min(queries, observed)).round().long().unique()

    def handler(call: AttentionCall) -> torch.Tensor:
        valid = key_validity(call)
        sinks = find_sinks(call.key, valid, sink_tokens)
        query, key = call.query.double(), call.key.double()
        gram_q, gram_k = prompt_grams(query, key, valid, sinks)
        kv_heads, groups, m = key.shape[1], query.shape[1] // key.shape[1], len(positions)
        stacked = query[0, :, positions].reshape(kv_heads, groups * m, -1)  # a group's heads, each with its m queries
        exact = stacked @ key[0].transpose(-1, -2) * call.scale  # (Hkv, G m, n)
        keys = torch.arange(n, device=query.device).view(1, n)
        rows = positions.to(query.device).repeat(groups).view(-1, 1)  # each stacked query's position
        visible = keys <= rows
        kept = visible & (keys > rows - recent_tokens)  # the window decode scores exactly
        if sinks is not None:
            kept |= torch.isin(keys, sinks.index[0])
        log_p = torch.log_softmax(exact.masked_fill(~visible, float("-inf")), dim=-1)
        for k, rank in enumerate(ranks):
            if rank >= shape.head_dim:
                continue
            maps = basis_from_grams(gram_q, gram_k, torch.full((kv_heads,), int(rank)), basis)
            low = (stacked @ maps.query_map[0]) @ (key[0] @ maps.key_map[0]).transpose(-1, -2) * call.scale
            scores = torch.where(kept, exact, low).masked_fill(~visible, float("-inf"))
            log_q = torch.log_softmax(scores, dim=-1)
            kl = (log_p.exp() * (log_p - log_q)).masked_fill(~visible, 0.0).sum(-1)
            kls[call.layer, k] = float(kl.mean())
        return call.full()

    with install(loaded.model).use(handler):
        loaded.model(input_ids=prefix.to(loaded.device))
    return kls


def key_energy_residuals(
    loaded: LoadedModel, prompt: torch.Tensor, ranks: Sequence[int], sink_tokens: int = SINK_TOKENS
) -> np.ndarray:
    """``(L, K)`` the share of each layer's key energy outside its top-``r`` singular directions, at each candidate.

    Per layer and key/value head, the eigenvalues ``s_1 >= s_2 >= ...`` of the Gram of the prompt's keys (``prompt``
    ``(1, n)``, the sinks left out as a key basis leaves them out): ``1 - sum_{i <= r} s_i / sum_i s_i``, averaged
    over the heads (0 at ranks ``>= d``). The energy criterion of adaptive-SVD rank selection (the ``energy:T``
    baseline of the prefill), as a profile a water-fill can spend; one forward pass.
    """
    if prompt.dim() != 2 or prompt.shape[0] != 1:
        raise ValueError(f"prompt must be one (1, n) token row, got shape {tuple(prompt.shape)}")
    shape = loaded.attention_shape
    residuals = np.zeros((shape.num_layers, len(ranks)))

    def handler(call: AttentionCall) -> torch.Tensor:
        valid = key_validity(call)
        sinks = find_sinks(call.key, valid, sink_tokens)
        _, gram_k = prompt_grams(call.query.double(), call.key.double(), valid, sinks)
        energy = torch.linalg.eigvalsh(gram_k[0]).flip(-1).clamp_min(0.0)  # (Hkv, d), descending
        captured = energy.cumsum(-1) / energy.sum(-1, keepdim=True)
        for k, rank in enumerate(ranks):
            if rank < shape.head_dim:
                residuals[call.layer, k] = float((1.0 - captured[:, int(rank) - 1]).mean())
        return call.full()

    with install(loaded.model).use(handler):
        loaded.model(input_ids=prompt.to(loaded.device))
    return residuals
