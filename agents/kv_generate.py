"""``python -m agents.generate --env DRRL-KVCache-v0``: generate with ranks a policy commits after looking.

For each prompt the full model generates the first ``--observe-tokens`` tokens with the full cache; the policy
(a trained agent's ``.safetensors`` file, or a rule of :mod:`oracle.kvcache`: ``static``, ``uniform``,
``logit_error``, ``self_profile``) then commits each layer's key-cache rank within ``--cache-budget`` from what
those tokens showed (one episode of DRRL-KVCache-v0 on the prompt, ``reset(options={"input_ids": ...})``), and
generation goes on with each layer's keys at its rank (the prompt and the observed tokens attended exactly; the sink
and the recent window exact; ``drrl_env.generation.decode``). Printed per prompt: the ranks, the key cache measured
from its tensors against a full-width one of the same tokens, the decision's cost (its FLOPs over those of the
tokens generated after it), unless ``--no-compare`` the KL per token from full attention teacher-forced on full
attention's own greedy continuation and the greedy agreement, and the text.

    python -m agents.generate --env DRRL-KVCache-v0 --policy runs/RUN/model.safetensors --prompts 2
    python -m agents.generate --env DRRL-KVCache-v0 --policy static --prompt "The history of the city" --context 8
    python -m agents.kv_generate ...   # the same command
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import gymnasium as gym
import torch

from agents.kv_evaluate import check_kv_spec, make_kv_policy, policy_decision_flops, policy_envs
from drrl_env.cli import ENV_IDS, add_env_arguments, at_least, env_kwargs
from drrl_env.generation.decode import generate, quality_against_full
from drrl_env.generation.kv_cache import cache_bytes, full_cache_bytes
from drrl_env.kvcache import KVCACHE_ENV_ID, DRRLKVCacheEnv
from drrl_env.lm.corpora import CorpusNotAvailableError
from drrl_env.lm.models import ModelNotAvailableError
from oracle.kvcache import KV_CEILINGS, generation_flops, play


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m agents.generate --env DRRL-KVCache-v0",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--policy", default="static", help="agent file or oracle.kvcache rule (default: static)")
    parser.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several)")
    parser.add_argument("--max-new-tokens", type=at_least(1), default=64, help="tokens generated after the commit")
    parser.add_argument("--no-compare", action="store_true", help="skip the comparison with full attention")
    parser.add_argument("--seed", type=int, default=0, help="seed of the policy's episode")
    parser.add_argument(
        "--compile", action="store_true",
        help="torch.compile the decode steps after the commit through a cache of fixed shapes (CUDA graphs on a GPU; "
        "the first prompt compiles, about a minute on a CPU)",
    )  # fmt: skip
    # the prompts: --prompt, or the first --prompts prompts of --context tokens of --split; the budget is the episode's
    add_env_arguments(parser, KVCACHE_ENV_ID, ENV_IDS, split="test", prompts=1, cache_budget=0.75)
    return parser


def kv_ranks(env: DRRLKVCacheEnv, policy, prompt: torch.Tensor | None, index: int, seed: int) -> dict:
    """One episode of ``policy`` on ``prompt`` (token ids; None: the pool's prompt ``index``): its last ``info``."""
    options = {"input_ids": prompt} if prompt is not None else {"prompt": index}
    budget = env.config.cache_budget
    if budget is not None:
        options["budget"] = budget[0]
    observation, _ = env.reset(seed=seed, options=options)
    return play(env, policy, observation, seed)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    kwargs = env_kwargs(vars(args))
    kwargs["cached_prompts"] = 1
    with contextlib.ExitStack() as stack:
        try:
            if args.policy in KV_CEILINGS:
                raise ValueError(f"--policy {args.policy} sees the text it is scored on: a ceiling, not a policy")
            check_kv_spec(args.policy, "--policy")
            gym.make(KVCACHE_ENV_ID, **kwargs).close()  # the command line's env options, checked before any work
            policy = make_kv_policy(args.policy, kwargs, args.seed)
            env = stack.enter_context(policy_envs(kwargs))(policy)  # an agent's env has its observation options
            tokenizer = env.loaded.tokenizer
            prompts = [tokenizer(text, return_tensors="pt").input_ids for text in args.prompt or []]
            for index, prompt in enumerate(prompts):
                if prompt.shape[1] < 2:
                    raise ValueError(f"prompt {index} is {prompt.shape[1]} token(s); a prompt needs at least 2")
        except (ValueError, OSError, ModelNotAvailableError, CorpusNotAvailableError) as error:
            print(f"error: {str(error).strip().splitlines()[0]}", file=sys.stderr)
            return 2
        try:
            for index in range(len(prompts) or kwargs["prompts"]):
                report(env, policy, prompts[index] if prompts else None, index, args)
        except ValueError as error:
            print(f"error: {str(error).strip().splitlines()[0]}", file=sys.stderr)
            return 2
    return 0


def report(env: DRRLKVCacheEnv, policy, prompt: torch.Tensor | None, index: int, args: argparse.Namespace) -> None:
    """Commit the ranks after the observed tokens, generate on, and print ranks, cache, cost, quality and text."""
    cfg, loaded = env.config, env.loaded
    info = kv_ranks(env, policy, prompt, index, args.seed + index)
    ranks, prefix = info["ranks"], env.current_prompt.prefix  # the prompt and the observed tokens
    options = {"sink_tokens": cfg.sink_tokens, "recent_tokens": cfg.recent_tokens, "exact_prefill": True}
    out = generate(
        loaded, prefix.to(env.device), ranks, basis=cfg.basis, **options, max_new_tokens=args.max_new_tokens,
        compiled=args.compile, do_sample=False, return_dict_in_generate=True,
        pad_token_id=loaded.tokenizer.eos_token_id,
    )  # fmt: skip
    generated = out.sequences[:, prefix.shape[1] :].cpu()
    keys = cache_bytes(out.cache)["keys"]
    full_keys = full_cache_bytes(loaded, 1, out.sequences.shape[1] - 1) // 2
    cost = policy_decision_flops(env, policy) / generation_flops(env, args.max_new_tokens)
    print(f"prompt {index}: {env.prompt_ids.shape[1]} tokens, {cfg.observe_tokens} observed; policy {policy.name}")
    print("ranks per layer:", " ".join(str(rank) for rank in ranks))
    print(f"key cache {keys / 2**20:.2f} MB = {keys / full_keys:.3f} of full width ({full_keys / 2**20:.2f} MB); "
          f"decision {100 * cost:.2g} % of the FLOPs of the {args.max_new_tokens} tokens generated")  # fmt: skip
    if not args.no_compare:
        kl, agreement = quality_against_full(
            loaded, prefix.to(env.device), generated, ranks, cfg.basis, args.max_new_tokens, **options
        )
        print(f"against full attention: KL {kl:.5f} nats/token (teacher-forced), greedy agreement {agreement:.3f}")
    print("text:", loaded.tokenizer.decode(generated[0], skip_special_tokens=True))
    print()


if __name__ == "__main__":
    sys.exit(main())
