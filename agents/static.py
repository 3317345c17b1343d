"""Static per-layer rank allocation: the strongest baseline that does not adapt to the input.

It profiles, on validation text, how much each layer alone costs in LM loss at each candidate rank
(all other layers at full attention), then lowers ranks greedily where the marginal loss per
FLOP saved is smallest, until the attention FLOPs (overheads included, relative to full
attention) meet a budget. Sending the least sensitive layers straight to the minimum rank is
worse than this: cost is convex in rank, so the marginal rule spreads the cuts. An input-adaptive
agent has to beat this at equal FLOPs for adaptivity to mean anything.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from drrl_env.corpora import DEFAULT_CORPUS, EVALUATION_ONLY, corpus_tokens, sequential_chunks
from drrl_env.env import DRRLAttentionEnv, EnvConfig
from drrl_env.flops import full_attention_flops, low_rank_attention_flops
from drrl_env.guardrail import nearest_allowed
from drrl_env.models import load_causal_lm, resolve_device
from drrl_env.perplexity import LayerRanks, evaluate_perplexity


def allocate_ranks(cost: np.ndarray, flops: np.ndarray, budget: float) -> list[int]:
    """Greedy marginal allocation: candidate index per layer whose mean FLOPs ratio is ``<= budget``.

    Args:
        cost: ``(L, K)`` loss increase of each layer alone at each candidate rank (ascending ranks).
        flops: ``(K,)`` attention FLOPs ratio of a layer at each candidate rank (the same for every layer).
        budget: target mean FLOPs ratio over layers. If even the minimum ranks exceed it, all
            layers end at the minimum.

    Starting from the largest candidate everywhere, each move lowers one layer by one candidate,
    the one with the smallest ``cost increase / FLOPs saved``.
    """
    num_layers, num_candidates = cost.shape
    chosen = [num_candidates - 1] * num_layers
    while np.mean(flops[chosen]) > budget:
        best, best_price = None, np.inf
        for layer, index in enumerate(chosen):
            if index == 0:
                continue
            saved = flops[index] - flops[index - 1]
            price = (cost[layer, index - 1] - cost[layer, index]) / max(saved, 1e-12)
            if price < best_price:
                best, best_price = layer, price
        if best is None:
            break
        chosen[best] -= 1
    return chosen


@dataclass
class StaticAllocation:
    """One fixed candidate index per layer (see :func:`allocate_ranks`), whatever the input."""

    budget: float
    layer_choices: tuple[int, ...]
    ranks: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"static:{self.budget:g}"

    def reset(self, seed: int) -> None:
        del seed

    def act(self, observation: np.ndarray, action_mask: np.ndarray, env: DRRLAttentionEnv) -> int:
        index = self.layer_choices[env.attention_call.layer]
        return nearest_allowed(self.ranks[index], action_mask, env.config.ranks)

    @classmethod
    def profile(
        cls, budget: float, env_kwargs: dict, max_tokens: int = 2048, progress: bool = True
    ) -> StaticAllocation:
        """Profile each layer's loss at each candidate rank on validation text, then allocate for ``budget``.

        The validation split of the env's corpus is used, or of the default corpus for an
        evaluation-only corpus (news, shakespeare): the allocation is chosen on text other than
        the text it is evaluated on. Profiles are cached per process.
        """
        if not 0 < budget:
            raise ValueError(f"budget (mean attention FLOPs ratio) must be > 0, got {budget}")
        config = EnvConfig(**env_kwargs)
        corpus = DEFAULT_CORPUS if config.corpus in EVALUATION_ONLY else config.corpus
        cost, flops = _layer_profile(
            config.model,
            corpus,
            config.seq_len,
            config.segment_len,
            config.ranks,
            config.spectral_mode,
            config.device,
            max_tokens,
            progress,
        )
        return cls(budget, tuple(allocate_ranks(cost, flops, budget)), config.ranks)


@functools.cache
def _layer_profile(
    model: str,
    corpus: str,
    seq_len: int,
    segment_len: int | None,
    ranks: tuple[int, ...],
    mode: str,
    device: str,
    max_tokens: int,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """``cost (L, K)``: loss increase of each layer alone at each rank; ``flops (K,)``: FLOPs ratio per rank."""
    loaded = load_causal_lm(model, device=str(resolve_device(device)))
    chunks = sequential_chunks(corpus_tokens(corpus, "validation", loaded.tokenizer), seq_len, max_tokens)
    shape = loaded.attention_shape
    base = evaluate_perplexity(loaded, chunks, None, segment_len=segment_len).mean_nll
    cost = np.zeros((shape.num_layers, len(ranks)))
    cells = [(layer, k) for layer in range(shape.num_layers) for k in range(len(ranks))]
    for layer, k in tqdm(cells, desc="static allocation: profiling layers x ranks", disable=not progress):
        layer_ranks: list[int | None] = [None] * shape.num_layers
        layer_ranks[layer] = ranks[k]
        handler = LayerRanks(tuple(layer_ranks), mode)
        cost[layer, k] = evaluate_perplexity(loaded, chunks, handler, segment_len=segment_len).mean_nll - base
    full = full_attention_flops(1, shape.q_heads, seq_len, seq_len, shape.head_dim).total
    flops = [
        low_rank_attention_flops(1, shape.q_heads, shape.kv_heads, seq_len, seq_len, shape.head_dim, r, mode).total
        for r in ranks
    ]
    return cost, np.asarray(flops) / full
