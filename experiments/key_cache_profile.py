"""Per-layer key-cache ranks from a profile taken where the key cache works: decode, not prefill.

The static allocation of the env (``static:fisher``) profiles what a layer's rank costs in a
prefill where every query is projected; in the key cache (``drrl_env.generation.decode``) the prompt is
attended exactly and only the generated tokens' queries meet compressed keys, beyond the recent
window. This script profiles that regime on validation text
(:func:`drrl_env.generation.decode_profile.decode_kl_profile`:
for each layer ``l`` and candidate rank ``r``, the mean per-step KL(full || low rank) of a
teacher-forced continuation with layer ``l`` alone at rank ``r``, every other layer's keys at full
width), then water-fills a budget of
mean rank share over the layers (``drrl_env.profiles.waterfill.allocate_ranks``) and scores the
allocation on test prompts against uniform ranks at the same mean, each teacher-forced on full
attention's greedy continuation (as ``python -m agents.generate`` does).

    python -m experiments.key_cache_profile --profile-context 1024 --profile-tokens 64 --context 4096 --prompts 4
    python -m experiments.key_cache_profile --profile-context 1024 4096 --profile-prompts 2 --mean-rank 31 --prompts 8
    python -m experiments.key_cache_profile --mean-rank 31 --prompts 8 --hindsight   # and the per-prompt ceiling
    python -m experiments.key_cache_profile --mean-rank 31 --prompts 8 --self-profile 16 --blend 0.5  # causal

The printed allocation plays in generation as ``python -m agents.generate --policy layers:R,R,...``;
``--policy static:F:decode`` profiles and allocates the same way inside the zoo (cached on disk).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from drrl_env.generation.decode import teacher_forced_logits
from drrl_env.generation.decode_profile import decode_kl_profile, greedy_continuation
from drrl_env.lm.corpora import corpus_tokens, sequential_chunks
from drrl_env.lm.models import DEFAULT_MODEL, load_causal_lm
from drrl_env.lm.scoring import next_token_kl
from drrl_env.profiles.waterfill import allocate_ranks, rank_shares


def continuation_kl(loaded, prompt: torch.Tensor, tokens: int, ranks_list: list, skip: int = 0) -> list[float]:
    """KL(full || low rank) per step, teacher-forced on full attention's greedy continuation, for each ranks spec.

    The first ``skip`` steps are left out of the mean.
    """
    continuation = greedy_continuation(loaded, prompt, tokens)
    reference = teacher_forced_logits(loaded, prompt, continuation, "full")[:, skip:]
    return [
        next_token_kl(reference, teacher_forced_logits(loaded, prompt, continuation, r)[:, skip:]) for r in ranks_list
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="causal LM (default: the offline default)")
    parser.add_argument(
        "--profile-context",
        type=int,
        nargs="+",
        default=[1024],
        help="validation prompt length of the profile (several: one profile and allocation each, scored side by side)",
    )
    parser.add_argument("--profile-prompts", type=int, default=1, help="validation prompts the profile averages")
    parser.add_argument("--profile-tokens", type=int, default=64, help="teacher-forced tokens per profile cell")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 48], help="candidate ranks below d")
    parser.add_argument("--mean-rank", type=float, default=32, help="mean rank of the allocation")
    parser.add_argument("--context", type=int, default=4096, help="test prompt length")
    parser.add_argument("--prompts", type=int, default=4, help="test prompts")
    parser.add_argument("--tokens", type=int, default=128, help="teacher-forced tokens per test prompt")
    parser.add_argument(
        "--hindsight",
        action="store_true",
        help="also the ceiling: each test prompt's allocation from its own decode profile (its scored continuation)",
    )
    parser.add_argument(
        "--self-profile",
        type=int,
        default=0,
        metavar="N",
        help="also a causal per-prompt allocation: each test prompt's decode profile over the first N tokens full "
        "attention generates for it; every row is then scored on the steps after those N",
    )
    parser.add_argument(
        "--blend",
        type=float,
        default=None,
        metavar="W",
        help="with --self-profile: also allocate (1 - W) x the first validation profile + W x the prompt's own",
    )
    args = parser.parse_args(argv)
    loaded = load_causal_lm(args.model)
    d = loaded.attention_shape.head_dim
    below = sorted({rank for rank in args.ranks if rank < d})  # profiled; the cost columns follow this order
    candidates = (*below, d)

    def allocate(cost: np.ndarray) -> list[int]:
        """The candidate ranks of the water-fill of ``cost`` at the mean rank."""
        return [candidates[k] for k in allocate_ranks(cost, rank_shares(candidates, d), args.mean_rank / d)]

    start, allocations, costs = time.time(), {}, {}
    for context in args.profile_context:
        validation = sequential_chunks(corpus_tokens("wiki", "validation", loaded.tokenizer), context)
        prompts = validation[: args.profile_prompts]
        cost = costs[context] = decode_kl_profile(loaded, prompts, candidates, args.profile_tokens, progress=True)
        print(f"profile at {context} ({time.time() - start:.0f} s), KL per layer at ranks {below}:")
        print(np.array2string(cost[:, :-1], precision=4, suppress_small=True))
        allocations[context] = allocate(cost)
        print("allocation:", allocations[context], "mean", np.mean(allocations[context]))
    test = sequential_chunks(corpus_tokens("wiki", "test", loaded.tokenizer), args.context)[: args.prompts]
    names = [f"uniform {int(args.mean_rank)}"] + [f"allocated, profile at {context}" for context in allocations]
    names += ["hindsight (each prompt's own profile)"] if args.hindsight else []
    names += [f"self-profile (each prompt's first {args.self_profile} generated tokens)"] if args.self_profile else []
    blend = args.self_profile and args.blend is not None
    names += [f"blend {1 - args.blend:g} x validation + {args.blend:g} x self-profile"] if blend else []
    rows = []
    for prompt in test:
        specs = [int(args.mean_rank), *allocations.values()]
        own = [("hindsight", args.tokens)] if args.hindsight else []  # label-free, but the continuation scored
        own += [("self-profile", args.self_profile)] if args.self_profile else []  # only what precedes the scored steps
        for name, tokens in own:
            cost = decode_kl_profile(loaded, prompt[None], candidates, tokens)
            specs.append(allocate(cost))
            print(f"{name} allocation:", specs[-1], "mean", np.mean(specs[-1]))
        if blend:  # cost is the self-profile's: shrink it toward the validation profile
            cost = (1 - args.blend) * costs[args.profile_context[0]] + args.blend * cost
            specs.append(allocate(cost))
            print("blend allocation:", specs[-1], "mean", np.mean(specs[-1]))
        rows.append(continuation_kl(loaded, prompt[None], args.tokens, specs, skip=args.self_profile))
    rows = np.asarray(rows).T
    if args.self_profile:
        print(f"KL over the steps after the first {args.self_profile}:")
    for name, row in zip(names, rows, strict=True):
        print(f"{name}: {np.round(row, 4).tolist()} mean {row.mean():.4f}")
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
