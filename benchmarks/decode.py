"""Generation with a low-rank key cache against plain generation, measured side by side in one run.

For each context length n (wiki test prompts of exactly n tokens) and batch size B, greedy
generation of T new tokens (EOS suppressed, so every run generates T):

* ``full``: plain ``model.generate`` (transformers' DynamicCache and SDPA attention; it grows by concatenation,
  a copy of the whole cache every token);
* each basis (``separate``, ``joint``, ``calibrated``) at each rank r (every layer at r), and at
  each ``--layer-ranks`` allocation (one rank per layer, e.g. the ``static:F:decode`` allocation
  that ``experiments/key_cache_profile.py`` prints), through :func:`drrl_env.generation.decode.generate`, with
  its defaults (one exact sink key, the last ``--recent-tokens`` keys exact for each decode step,
  the prompt attended exactly) unless told; its cache has storage for the whole generation, written in place;
* with ``--storage``, the same rows growing by concatenation (``BASIS concatenated``), and full attention through
  drrl's cache with storage (``full, stored``): the two ways of storing a cache side by side;
* with ``--static``, the same rows through the cache of fixed shapes (``BASIS static``,
  :mod:`drrl_env.generation.static_cache`) and full attention through transformers' ``StaticCache`` (``full,
  static``); with ``--compile`` also each of these with its decode steps compiled (``... compiled``, transformers'
  compilation of ``generate``; each compiled row is generated twice and the second is timed: the first compiles);
* each ``--policy`` of DRRL-KVCache-v0 (a rule of :mod:`oracle.kvcache` such as ``static``, or a trained agent's
  file) at ``--cache-budget``: the policy commits each quality prompt's ranks after the full model's first
  ``--observe-tokens`` tokens (one episode of the env on the prompt, ``agents.kv_generate.kv_ranks``); the quality
  columns score each prompt with its own ranks, and the timing runs the batch with the first prompt's ranks
  (:class:`~drrl_env.generation.kv_cache.LowRankKeyCache` holds one rank per layer and head for a whole batch;
  at an equal budget the cache's bytes, and so the decode time, hardly depend on which layers get the bytes).

Columns: key/value cache bytes at the end (measured from the cache's tensors) and their ratio to
full; prefill ms; decode ms/token (median over the T - 1 decode steps of one generation, after a
warm-up generation) and its ratio to full; the decode attention FLOPs ratio (``drrl_env.attention.flops``);
and quality against full attention on ``--quality-prompts`` prompts per context (independent of
B): the mean per-step KL(full || low rank) of the next-token distribution, teacher-forced on the
full model's greedy continuation, the teacher-forced top-1 agreement, and the free-running greedy
agreement (share of the T positions where the generated token equals full generation's).

It also measures the memory bandwidth the machine reaches on a plain reduction and the one each
decode step reaches (parameter bytes plus cache bytes read per step, over the step time), to say
what bounds decode.

Set ``MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184`` for timings on Linux:
otherwise glibc may return the cache's per-step allocations to the OS and fault them back in,
which made full attention's decode time vary 2x between runs (docs/benchmarks.md).

    python benchmarks/decode.py [--contexts 1024 4096] [--batches 1 8] [--new-tokens 128] [--recent-tokens 64]
                                [--layer-ranks R,R,...] [--low-rank-prefill] [--storage] [--static [--compile]]
                                [--out FILE.json]
                                [--policy static --policy AGENT.safetensors --cache-budget 0.75]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import NamedTuple

import torch
from transformers.generation.streamers import BaseStreamer

from agents.kv_evaluate import check_kv_spec, make_kv_policy, policy_envs
from agents.kv_generate import kv_ranks
from drrl_env.attention.flops import key_cache_generation_flops
from drrl_env.attention.kv_basis import BASIS_KINDS
from drrl_env.generation.decode import CACHE_KEYWORD, compile_config, generate, teacher_forced_logits
from drrl_env.generation.kv_attention import RECENT_TOKENS, SINK_TOKENS
from drrl_env.generation.kv_cache import cache_bytes
from drrl_env.kvcache import KVCacheConfig
from drrl_env.lm.corpora import corpus_tokens, sequential_chunks
from drrl_env.lm.files import write_text_atomic
from drrl_env.lm.models import DEFAULT_MODEL, LoadedModel, load_causal_lm
from drrl_env.lm.scoring import next_token_kl
from drrl_env.profiles.calibration import calibration_grams
from oracle.kvcache import KV_CEILINGS


class StepClock(BaseStreamer):
    """A streamer that records the time of every token batch ``generate`` emits (the prompt first)."""

    def __init__(self, sync) -> None:
        self.sync, self.times = sync, []

    def put(self, value: torch.Tensor) -> None:
        self.sync()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def prefill_and_step_ms(self) -> tuple[float, float]:
        """Prefill ms (prompt to first token) and the median ms of the later decode steps."""
        gaps = [1000 * (b - a) for a, b in zip(self.times, self.times[1:], strict=False)]
        return gaps[0], statistics.median(gaps[1:])


def read_bandwidth_gbs(device: torch.device, megabytes: int = 512, repeats: int = 5) -> float:
    """GB/s of a plain float32 reduction over ``megabytes`` (the bandwidth a streaming read reaches)."""
    data = torch.ones(megabytes * 2**20 // 4, device=device)
    data.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        float(data.sum())
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


def timed_generation(
    loaded: LoadedModel,
    prompts: torch.Tensor,
    new_tokens: int,
    basis: str | None,
    rank,
    sync,
    options: dict,
    cache: str = "stored",
):
    """One greedy generation of exactly ``new_tokens`` tokens: (sequences, cache bytes, prefill ms, decode ms/token).

    ``options``: ``generate``'s ``sink_tokens``, ``recent_tokens``, ``exact_prefill`` and ``calibration``;
    ``cache`` (one of ``CACHES``): storage written in place, growth by concatenation, a cache of fixed shapes, or
    that with the decode steps compiled (generated twice, the second timed). With ``basis`` None, transformers' own
    ``generate`` with SDPA: its DynamicCache for ``stored`` (which concatenates), its StaticCache for ``static``.
    """
    if cache == "compiled":  # the first generation compiles the decode step for these shapes, from a clean slate
        torch._dynamo.reset()
        greedy_generation(loaded, prompts, new_tokens, basis, rank, options, cache, StepClock(sync))
    clock = StepClock(sync)
    out = greedy_generation(loaded, prompts, new_tokens, basis, rank, options, cache, clock)
    prefill_ms, step_ms = clock.prefill_and_step_ms()
    return out.sequences[:, prompts.shape[1] :].cpu(), cache_bytes(getattr(out, CACHE_KEYWORD)), prefill_ms, step_ms


def greedy_generation(
    loaded: LoadedModel,
    prompts: torch.Tensor,
    new_tokens: int,
    basis: str | None,
    rank,
    options: dict,
    cache: str,
    clock: StepClock,
):
    """``generate``'s output for :func:`timed_generation`'s arguments, each token batch recorded by ``clock``."""
    settings = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock,
        return_dict_in_generate=True, pad_token_id=loaded.tokenizer.eos_token_id,
    )  # fmt: skip
    if basis is None:  # transformers' own SDPA attention, not the drrl hook
        if cache in ("static", "compiled"):
            settings["cache_implementation"] = "static"
            if cache == "compiled":
                settings["compile_config"] = compile_config(loaded.device)
            else:
                settings["disable_compile"] = True
        implementation = loaded.model.config._attn_implementation
        loaded.model.set_attn_implementation("sdpa")
        try:
            return loaded.model.generate(input_ids=prompts.to(loaded.device), **settings)
        finally:
            loaded.model.set_attn_implementation(implementation)
    kinds = {"preallocate": cache != "concatenated", "static": cache == "static", "compiled": cache == "compiled"}
    return generate(loaded, prompts, rank, basis=basis, **kinds, **settings, **options)


def kl_and_agreement(full_logits: torch.Tensor, low_logits: torch.Tensor) -> tuple[float, float]:
    """Mean per-step KL(full || low) in nats, and top-1 agreement, over ``(B, T, V)`` logits."""
    agreement = (full_logits.argmax(-1) == low_logits.argmax(-1)).double()
    return next_token_kl(full_logits, low_logits), float(agreement.mean())


def attention_flops_ratio(
    loaded: LoadedModel, context: int, new_tokens: int, rank: int | list[int], basis: str, options: dict
) -> float:
    """Decode attention FLOPs (with overheads) at ``rank`` (one for every layer, or one per layer) over full."""
    shape = loaded.attention_shape
    ranks = [rank] * shape.num_layers if isinstance(rank, int) else rank

    def decode_flops(r: int) -> float:
        args = (1, shape.q_heads, shape.kv_heads, context, new_tokens - 1, shape.head_dim, r, basis)
        return key_cache_generation_flops(*args, **options).decode.total

    return sum(decode_flops(r) for r in ranks) / (shape.num_layers * decode_flops(shape.head_dim))


def layer_ranks(text: str) -> list[int]:
    """``--layer-ranks``: comma-separated ranks, one per layer."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integer ranks, got {text!r}") from None


def policy_env_kwargs(args: argparse.Namespace, context: int) -> dict:
    """``gym.make`` keywords of the DRRL-KVCache-v0 env whose episodes commit the ``--policy`` ranks at ``context``."""
    return {
        "model": args.model, "device": args.device, "corpus": "wiki", "split": "test", "context": context,
        "prompts": args.quality_prompts, "observe_tokens": args.observe_tokens, "horizon": 2,
        "cache_budget": args.cache_budget, "basis": "joint", "sink_tokens": args.sink_tokens,
        "recent_tokens": args.recent_tokens, "cached_prompts": 1,
    }  # fmt: skip


def policy_ranks(args: argparse.Namespace, context: int) -> dict[str, list[list[int]]]:
    """Per ``--policy``, the ranks it commits on each of the first ``--quality-prompts`` wiki test prompts.

    Episodes of DRRL-KVCache-v0 on those prompts (the pool of the test split at ``context`` tokens: the first of
    :func:`sequential_chunks`, as the benchmark's); an agent plays in an env with the observation options it was
    trained with (:func:`agents.kv_evaluate.policy_envs`), the envs sharing the prompts' states.
    """
    if not args.policy:
        return {}
    kwargs = policy_env_kwargs(args, context)
    policies = {spec: make_kv_policy(spec, kwargs, 0, args.trust_pickle) for spec in args.policy}
    ranks: dict[str, list[list[int]]] = {spec: [] for spec in args.policy}
    with policy_envs(kwargs) as env_of:
        for index in range(args.quality_prompts):
            for spec, policy in policies.items():
                ranks[spec].append(
                    [int(rank) for rank in kv_ranks(env_of(policy), policy, None, index, index)["ranks"]]
                )
    return ranks


def rank_label(rank: int | list[int] | None) -> str:
    """A row's rank column: ``full``, the rank, or an allocation's mean rank."""
    if rank is None:
        return "full"
    return str(rank) if isinstance(rank, int) else f"layers (mean {sum(rank) / len(rank):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name or local path")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096], help="prompt lengths n")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes B for the timing")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt (T)")
    parser.add_argument("--ranks", type=int, nargs="*", default=[48, 32, 16], help="ranks r (every layer)")
    parser.add_argument(
        "--layer-ranks",
        type=layer_ranks,
        action="append",
        default=[],
        help="also an allocation of one rank per layer, comma-separated (repeat for several)",
    )
    parser.add_argument("--bases", nargs="+", default=list(BASIS_KINDS), choices=BASIS_KINDS, help="key bases")
    parser.add_argument("--recent-tokens", type=int, default=RECENT_TOKENS, help="window of exact recent keys")
    parser.add_argument("--sink-tokens", type=int, default=SINK_TOKENS, help="first tokens whose keys stay exact")
    parser.add_argument("--low-rank-prefill", action="store_true", help="attend the prompt through the basis too")
    parser.add_argument(
        "--calibration-len", type=int, default=4096, help="calibrated basis: tokens per calibration chunk (>= context)"
    )
    parser.add_argument("--calibration-tokens", type=int, default=32768, help="calibrated basis: validation tokens")
    parser.add_argument("--quality-prompts", type=int, default=4, help="prompts per context for KL and agreement")
    parser.add_argument(
        "--policy",
        action="append",
        default=[],
        help="also a policy of DRRL-KVCache-v0 that commits each prompt's ranks after looking: a rule of "
        "oracle.kvcache (static, energy, ...) or an agent file (repeat for several; the joint basis)",
    )
    parser.add_argument("--cache-budget", type=float, default=0.75, help="--policy: share of the full key cache")
    parser.add_argument("--observe-tokens", type=int, default=64, help="--policy: tokens generated before the commit")
    parser.add_argument("--trust-pickle", action="store_true", help="--policy: load an SB3 .zip (a pickle)")
    parser.add_argument(
        "--storage", action="store_true",
        help="also time full attention through drrl's cache with storage (row 'full, stored') and each low-rank row "
        "growing by concatenation ('BASIS concatenated'), beside the default rows (low rank written in place)",
    )  # fmt: skip
    parser.add_argument(
        "--static", action="store_true",
        help="also time each low-rank row through the cache of fixed shapes ('BASIS static') and full attention "
        "through transformers' StaticCache ('full, static')",
    )  # fmt: skip
    parser.add_argument(
        "--compile", action="store_true",
        help="with --static: also each static row with its decode steps compiled ('... compiled'; minutes on a CPU)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    if args.compile and not args.static:
        parser.error("--compile times the static rows compiled: pass --static too")
    try:
        for spec in args.policy:
            if spec in KV_CEILINGS:
                raise ValueError(f"--policy {spec} sees the text it is scored on: a ceiling, not a policy")
            check_kv_spec(spec, "--policy")
        for context in args.contexts if args.policy else []:
            KVCacheConfig.from_kwargs(policy_env_kwargs(args, context))
    except ValueError as error:
        parser.error(str(error))
    options = {
        "sink_tokens": args.sink_tokens, "recent_tokens": args.recent_tokens, "exact_prefill": not args.low_rank_prefill
    }  # fmt: skip
    loaded = load_causal_lm(args.model, args.device)
    device = loaded.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # computed (or loaded) once, outside every timing; the generations take it with the other cache options
    calibration = (
        calibration_grams(loaded, tokens=args.calibration_tokens, seq_len=args.calibration_len)
        if "calibrated" in args.bases
        else None
    )
    generation = {**options, "calibration": calibration}
    tokens = corpus_tokens("wiki", "test", loaded.tokenizer)
    parameter_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    bandwidth = read_bandwidth_gbs(device)
    print(
        f"model {args.model} on {device}; torch threads {torch.get_num_threads()}; read bandwidth {bandwidth:.1f} GB/s"
    )
    print(HEADER)
    if any(len(ranks) != loaded.attention_shape.num_layers for ranks in args.layer_ranks):
        parser.error(f"--layer-ranks needs one rank per layer ({loaded.attention_shape.num_layers})")
    for context in args.contexts:  # a batch larger than the split's prompts would silently time fewer
        available = tokens.numel() // context
        if max(args.batches + [args.quality_prompts]) > available:
            parser.error(
                f"--batches {max(args.batches)} / --quality-prompts {args.quality_prompts}: the wiki test split has "
                f"{available} prompts of {context} tokens; ask for at most {available}"
            )
    configs = [(basis, rank) for basis in args.bases for rank in args.ranks + args.layer_ranks]
    low_runs = [Run(basis, basis, rank, "stored", basis) for basis, rank in configs]
    # --storage: each low-rank row growing by concatenation, and full attention through drrl's cache with storage
    storage_runs = [Run(f"{basis} concatenated", basis, rank, "concatenated", basis) for basis, rank in configs]
    storage_runs = [*storage_runs, Run(FULL_STORED, "joint", "full", "stored", None)] if args.storage else []
    static_runs = [
        Run(f"{basis} {cache}" if basis else f"full, {cache}", basis, rank, cache, basis)
        for cache in ["static", "compiled"][: 1 + args.compile] if args.static
        for basis, rank in [(None, None), *configs]
    ]  # fmt: skip
    rows = []
    for context in args.contexts:
        chunks = sequential_chunks(tokens, context)
        quality_prompts = chunks[: args.quality_prompts]
        reference, *_ = timed_generation(loaded, quality_prompts, args.new_tokens, None, None, sync, generation)
        full_logits = teacher_forced_logits(loaded, quality_prompts, reference, "full")
        quality = {}
        for basis, rank in configs:
            low = teacher_forced_logits(loaded, quality_prompts, reference, rank, basis, **generation)
            quality[basis, str(rank)] = kl_and_agreement(full_logits, low)
        policy_runs = []
        for spec, per_prompt in policy_ranks(args, context).items():  # each prompt through its own ranks
            low = torch.cat([
                teacher_forced_logits(loaded, quality_prompts[i : i + 1], reference[i : i + 1], ranks, "joint",
                                      **generation)
                for i, ranks in enumerate(per_prompt)
            ])  # fmt: skip
            quality[f"policy {spec}", str(per_prompt[0])] = kl_and_agreement(full_logits, low)
            policy_runs.append(Run(f"policy {spec}", "joint", per_prompt[0], "stored", f"policy {spec}"))
        for batch in args.batches:
            prompts = chunks[:batch]
            warm_rank = args.ranks[0] if args.ranks else loaded.attention_shape.head_dim // 2
            timed_generation(loaded, prompts[:, :64], 4, "joint", warm_rank, sync, generation)  # warm-up
            baseline = None
            runs = [Run("full", None, None, "stored", None), *low_runs, *policy_runs, *storage_runs, *static_runs]
            for run in runs:
                generated, sizes, prefill_ms, step_ms = timed_generation(
                    loaded, prompts, args.new_tokens, run.kind, run.rank, sync, generation, run.cache
                )
                if baseline is None:
                    baseline = (generated, sizes, step_ms)
                kl, top1 = quality.get((run.quality, str(run.rank)), (0.0, 1.0))
                full_rank = run.kind is None or run.rank == "full"
                rows.append(
                    {
                        "context": context, "batch": batch, "basis": run.label,
                        "rank": run.rank if isinstance(run.rank, (int, str)) else rank_label(run.rank),
                        "layer_ranks": run.rank if isinstance(run.rank, list) else None,
                        "cache_mb": sizes["total"] / 2**20, "cache_ratio": sizes["total"] / baseline[1]["total"],
                        "prefill_ms": prefill_ms, "decode_ms_per_token": step_ms,
                        "decode_ratio": step_ms / baseline[2],
                        "flops_ratio": 1.0 if full_rank else attention_flops_ratio(
                            loaded, context, args.new_tokens, run.rank, run.kind, options),
                        "kl": kl, "top1_teacher_forced": top1,
                        "greedy_agreement": float((generated == baseline[0]).double().mean()),
                        "reached_gbs": (parameter_bytes + sizes["total"]) / (step_ms / 1000) / 1e9,
                    }
                )  # fmt: skip
                print(format_row(rows[-1]), flush=True)
    if args.out is not None:
        calibrated_on = {"calibration_len": args.calibration_len, "calibration_tokens": args.calibration_tokens}
        write_text_atomic(
            args.out,
            json.dumps({"bandwidth_gbs": bandwidth, "options": {**options, **calibrated_on}, "rows": rows}, indent=1),
        )


class Run(NamedTuple):
    """One timed row: its ``basis`` column, ``generate``'s basis (None: transformers' own ``generate``), rank, cache
    (one of ``CACHES``: ``timed_generation``), and the key of its quality columns (None: full attention's)."""

    label: str
    kind: str | None
    rank: int | str | list[int] | None
    cache: str
    quality: str | None


CACHES = ("stored", "concatenated", "static", "compiled")


FULL_STORED = "full, stored"
"""--storage's full-attention row: drrl's cache at rank d with storage written in place (the plain ``full`` row is
transformers' DynamicCache, which grows by concatenation)"""

HEADER = (
    "| n | B | basis | r | KV MB | KV ratio | prefill ms | decode ms/tok | decode ratio | FLOPs ratio "
    "| KL | top-1 | greedy | GB/s |"
)


def format_row(row: dict) -> str:
    """One markdown table row (the header is ``HEADER``)."""
    return (
        f"| {row['context']} | {row['batch']} | {row['basis']} | {row['rank']} | {row['cache_mb']:.1f} | "
        f"{row['cache_ratio']:.3f} | {row['prefill_ms']:.0f} | {row['decode_ms_per_token']:.1f} | "
        f"{row['decode_ratio']:.3f} | {row['flops_ratio']:.3f} | {row['kl']:.4f} | {row['top1_teacher_forced']:.3f} | "
        f"{row['greedy_agreement']:.3f} | {row['reached_gbs']:.1f} |"
    )


if __name__ == "__main__":
    main()
