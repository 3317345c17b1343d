"""``python -m agents.generate``: generate text with a low-rank key cache whose ranks a policy picks from the prompt.

For each prompt, the policy (any spec of the zoo: ``fixed:32``, ``static:fisher``, ``energy:0.9``,
``hindsight:fisher``, or a trained agent's ``.safetensors`` file) runs one episode of
DRRL-Attention-v0 on the prompt itself (``reset(options={"input_ids": ...})``), choosing each
layer's rank within the episode's FLOPs budget. Generation then keeps each layer's keys at
that rank (``drrl_env.generation.decode``, basis ``--basis``). Printed per prompt: the ranks, the text,
the key/value cache measured from its tensors against a full-width cache of the same tokens, and
(unless ``--no-compare``) the quality against full attention: the mean per-step KL of the
next-token distribution, teacher-forced on full attention's greedy continuation, and the greedy
agreement.

    python -m agents.generate --policy static:fisher --prompt "The history of the city" --max-new-tokens 48
    python -m agents.generate --policy fixed:32 --corpus wiki --context 512 --prompts 2
    python -m agents.generate --policy static:0.484:decode --seq-len 1024 --ranks 16 32 48 64 --context 4096
    python -m agents.generate --env DRRL-KVCache-v0 --policy RUN/model.safetensors   # observe, then commit

``--env DRRL-KVCache-v0`` (:mod:`agents.kv_generate`): the policy commits the ranks after the full model's first
generated tokens, from what they showed (an agent of ``train_agent.py --env DRRL-KVCache-v0``).

``static:F:decode`` water-fills a profile of generation itself (:mod:`drrl_env.generation.decode_profile`, on
``--seq-len``-token validation prompts, cached on disk): the per-layer ranks that meet the key
cache's accuracy and memory targets together at 4096 tokens (docs/benchmarks.md, run 6); a
profile of a prefill (``static``, ``static:fisher``) does not transfer to decode.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import gymnasium as gym
import torch

from agents.zoo import check_policy_spec, make_policy
from drrl_env import ENV_ID
from drrl_env.attention.kv_basis import BASIS_KINDS, PER_PROMPT_KINDS
from drrl_env.cli import ENV_IDS, add_env_arguments, at_least, dataclass_from_options, env_id_of, env_kwargs
from drrl_env.config import PER_LAYER_ENV_ID
from drrl_env.env import DRRLAttentionEnv
from drrl_env.generation.decode import generate, quality_against_full
from drrl_env.generation.kv_attention import RECENT_TOKENS, SINK_TOKENS
from drrl_env.generation.kv_cache import cache_bytes, full_cache_bytes
from drrl_env.kvcache import KVCACHE_ENV_ID
from drrl_env.lm.corpora import CorpusNotAvailableError, corpus_tokens, sequential_chunks
from drrl_env.lm.models import LoadedModel, ModelNotAvailableError, load_causal_lm
from drrl_env.profiles.calibration import CALIBRATION_SEQ_LEN, CALIBRATION_TOKENS, calibration_grams
from oracle.policy import RankPolicy


@dataclass
class GenerationConfig:
    """How ``python -m agents.generate`` builds the key cache, decodes and reports (its options by field name)."""

    basis: str = "joint"
    """key basis (drrl_env.attention.kv_basis.BASIS_KINDS)"""
    sink_tokens: int = SINK_TOKENS
    """first tokens whose keys stay exact"""
    recent_tokens: int = RECENT_TOKENS
    """window of last positions whose keys stay exact for each decode step"""
    calibration_len: int = CALIBRATION_SEQ_LEN
    """basis 'calibrated': tokens per calibration chunk"""
    calibration_tokens: int = CALIBRATION_TOKENS
    """basis 'calibrated': validation tokens the bases are fitted on"""
    low_rank_prefill: bool = False
    """attend the prompt through the basis too"""
    max_new_tokens: int = 48
    """tokens to generate per prompt"""
    do_sample: bool = False
    """sample instead of greedy decoding"""
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    """seed of the policy's episode and of sampling"""
    no_compare: bool = False
    """skip the comparison with full attention"""
    compile: bool = False
    """compile the decode steps (a static cache: drrl_env.generation.static_cache)"""


def policy_ranks(policy: RankPolicy, kwargs: dict, prompt: torch.Tensor, seed: int) -> list[list[int]]:
    """The policy's ranks ``(L, Hkv)`` for ``prompt`` ``(1, n)``: one env episode over the prompt's own tokens."""
    env: DRRLAttentionEnv = gym.make(ENV_ID, **{**kwargs, "batch_size": 1, "seq_len": prompt.shape[1]}).unwrapped
    kv_heads = env.loaded.attention_shape.kv_heads
    ranks: list[list[int]] = [[] for _ in range(env.num_layers)]
    try:
        observation, _ = env.reset(seed=seed, options={"input_ids": prompt})
        policy.reset(seed)
        terminated = False
        while not terminated:
            action = policy.act(observation, env.action_masks(), env)
            observation, _, terminated, _, info = env.step(action)
            rank = info["rank"]
            ranks[info["layer"]] = list(rank) if isinstance(rank, list) else [int(rank)] * kv_heads
    finally:
        env.close()
    return ranks


def compare_with_full(
    loaded: LoadedModel, prompt: torch.Tensor, generated: torch.Tensor, ranks, config: GenerationConfig
) -> tuple[float, float]:
    """Mean per-step KL(full || low rank), teacher-forced on full greedy generation, and greedy agreement."""
    options = cache_options(loaded, config)
    return quality_against_full(loaded, prompt, generated, ranks, config.basis, config.max_new_tokens, **options)


def cache_options(loaded: LoadedModel, config: GenerationConfig) -> dict:
    """The keys kept exact, the prefill and the calibration, as ``drrl_env.generation.decode.generate`` takes them."""
    options = {"sink_tokens": config.sink_tokens, "recent_tokens": config.recent_tokens}
    options["exact_prefill"] = not config.low_rank_prefill
    if config.basis == "calibrated":
        options["calibration"] = calibration_grams(
            loaded, tokens=config.calibration_tokens, seq_len=config.calibration_len
        )
    return options


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m agents.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--policy", default="fixed:32", help="rank policy spec or agent file (default: fixed:32)")
    parser.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several)")
    parser.add_argument(
        "--context", type=at_least(2), default=512, help="without --prompt: tokens per prompt taken from --corpus"
    )
    parser.add_argument("--prompts", type=at_least(1), default=1, help="without --prompt: prompts from --corpus")
    parser.add_argument("--prompt-split", default="test", help="without --prompt: corpus split the prompts come from")
    parser.add_argument(
        "--basis",
        choices=BASIS_KINDS,
        default="joint",
        help="key basis (default: joint); also the env's --spectral-mode unless that is given (joint for a calibrated "
        "basis: the env's calibration is its own)",
    )
    parser.add_argument(
        "--sink-tokens", type=at_least(0), default=SINK_TOKENS, help="first tokens whose keys stay exact"
    )
    parser.add_argument(
        "--recent-tokens",
        type=at_least(0),
        default=RECENT_TOKENS,
        help=f"window of last positions whose keys stay exact for each decode step (default: {RECENT_TOKENS})",
    )
    parser.add_argument(
        "--calibration-len",
        type=at_least(2),
        default=CALIBRATION_SEQ_LEN,
        help=f"--basis calibrated: tokens per calibration chunk (default: {CALIBRATION_SEQ_LEN}); use at least the "
        "prompt length plus the new tokens: bases calibrated on 512 tokens collapse at 4096 (docs/benchmarks.md)",
    )
    parser.add_argument(
        "--calibration-tokens",
        type=at_least(2),
        default=CALIBRATION_TOKENS,
        help=f"--basis calibrated: validation tokens the bases are fitted on (default: {CALIBRATION_TOKENS})",
    )
    parser.add_argument(
        "--low-rank-prefill", action="store_true", help="attend the prompt through the basis too (default: exactly)"
    )
    parser.add_argument("--max-new-tokens", type=at_least(1), default=48, help="tokens to generate per prompt")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --do-sample)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the policy's episode and of sampling")
    parser.add_argument("--no-compare", action="store_true", help="skip the comparison with full attention")
    parser.add_argument(
        "--compile", action="store_true",
        help="torch.compile the decode steps through a cache of fixed shapes (CUDA graphs on a GPU; the first "
        "prompt compiles, about a minute on a CPU; prompts of the same length reuse the graph)",
    )  # fmt: skip
    parser.add_argument("--trust-pickle", action="store_true", help="allow loading an SB3 .zip policy (a pickle)")
    # one rank per layer and no per-input signal, as in the decode findings; None: the key basis (--basis)
    add_env_arguments(parser, env_id_of(argv, PER_LAYER_ENV_ID), spectral_mode=None, guardrail="off")
    return parser


def corpus_prompts(
    loaded: LoadedModel, texts: list[str] | None, corpus: str, split: str, context: int, count: int
) -> list[torch.Tensor]:
    """The prompts as ``(1, n)`` token tensors: each of ``texts``, or else ``count`` chunks of ``context`` tokens."""
    if texts:
        return [loaded.tokenizer(text, return_tensors="pt").input_ids for text in texts]
    chunks = sequential_chunks(corpus_tokens(corpus, split, loaded.tokenizer), context)
    return [chunk.unsqueeze(0) for chunk in chunks[:count]]


def main(argv: list[str] | None = None) -> int:
    if env_id_of(argv, PER_LAYER_ENV_ID, ENV_IDS) == KVCACHE_ENV_ID:  # observe, then commit: agents.kv_generate
        from agents.kv_generate import main as kv_main

        return kv_main(argv)
    args = build_parser(argv).parse_args(argv)
    if args.spectral_mode is None:  # a policy observes, and profiles, the basis generation uses
        args.spectral_mode = args.basis if args.basis in PER_PROMPT_KINDS else "joint"
    kwargs = {**env_kwargs(vars(args)), "segment_len": None}  # one decision per layer: one key basis per layer
    try:
        check_policy_spec(args.policy, "--policy")  # before the model loads
        loaded = load_causal_lm(args.model, device=kwargs["device"] if kwargs["device"] != "auto" else "cpu")
        prompts = corpus_prompts(loaded, args.prompt, args.corpus, args.prompt_split, args.context, args.prompts)
        for index, prompt in enumerate(prompts):  # before any work: the model's limits, in the user's terms
            if prompt.shape[1] < 2:
                raise ValueError(f"prompt {index} is {prompt.shape[1]} token(s); a prompt needs at least 2")
            loaded.check_length(prompt.shape[1] + args.max_new_tokens, f"prompt {index} plus --max-new-tokens")
        policy = make_policy(args.policy, kwargs, args.trust_pickle)
    except (ValueError, OSError, ModelNotAvailableError, CorpusNotAvailableError) as error:
        print(f"error: {str(error).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    config = dataclass_from_options(GenerationConfig, vars(args))
    torch.manual_seed(config.seed)
    try:
        for index, prompt in enumerate(prompts):
            report(loaded, policy, kwargs, prompt, index, config)
    except ValueError as error:
        print(f"error: {str(error).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


def report(
    loaded: LoadedModel, policy: RankPolicy, kwargs: dict, prompt: torch.Tensor, index: int, config: GenerationConfig
) -> None:
    """Pick the ranks for one prompt, generate, and print ranks, cache size, quality and text."""
    sampling = {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p} if config.do_sample else {}
    ranks = policy_ranks(policy, kwargs, prompt, config.seed + index)
    out = generate(
        loaded, prompt, ranks, basis=config.basis, **cache_options(loaded, config),
        max_new_tokens=config.max_new_tokens, compiled=config.compile,
        return_dict_in_generate=True, pad_token_id=loaded.tokenizer.eos_token_id, **sampling,
    )  # fmt: skip
    generated = out.sequences[:, prompt.shape[1] :].cpu()
    measured = cache_bytes(out.cache)["total"]
    full = full_cache_bytes(loaded, 1, out.sequences.shape[1] - 1)
    print(f"prompt {index}: {prompt.shape[1]} tokens; policy {policy.name}; basis {config.basis}")
    print("ranks per layer:", " ".join("/".join(str(r) for r in row) for row in ranks))
    print(f"KV cache {measured / 2**20:.2f} MB = {measured / full:.3f} of full width ({full / 2**20:.2f} MB)")
    if not config.no_compare:
        kl, agreement = compare_with_full(loaded, prompt, generated, ranks, config)
        print(f"against full attention: KL {kl:.4f} nats/token (teacher-forced), greedy agreement {agreement:.3f}")
    print("text:", loaded.tokenizer.decode(generated[0], skip_special_tokens=True))
    print()


if __name__ == "__main__":
    sys.exit(main())
