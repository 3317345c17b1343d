"""Is a forward-only per-input signal enough? The scaled output-delta profile against the Fisher one, per head.

The per-head Fisher profile (``drrl_env.profiles.sensitivity.fisher_kl_profile``) costs one forward and ``S``
backward passes per input. Eq. S (:mod:`drrl_env.profiles.delta_scale`) replaces it by the input's own
attention-output change at each candidate (one forward pass) times a per-cell scale fitted once on
validation text. This script measures how well that works: the log-correlation of each estimate with a
test input's own 16-sample Fisher profile (the BC teacher's signal), and the KL of its water-fill
(``hindsight:scaled_delta``) beside uniform, static:fisher, hindsight:fisher and the raw delta energy
(no scale), on the same held-out episodes at equal logit FLOPs.

    python experiments/delta_signal.py --budgets 0.625 0.5 --episodes 12
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from agents.evaluate import evaluate_policy
from agents.zoo import make_policy
from drrl_env.lm.corpora import corpus_tokens, sequential_chunks
from drrl_env.lm.models import load_causal_lm
from drrl_env.profiles.delta_scale import delta_scale
from drrl_env.profiles.sensitivity import delta_energy_profile, fisher_kl_profile
from drrl_env.profiles.waterfill import allocate_ranks, rank_shares
from experiments.teacher_neighbourhood import add_model_options
from oracle.hindsight import LayerAllocationPolicy


class RawDeltaAllocation(LayerAllocationPolicy):
    """Water-fill of the input's raw output-delta energy, no scale (what the scale adds)."""

    name = "delta:raw"

    def allocate(self, env) -> list:
        config = env.config
        energy = delta_energy_profile(
            env.loaded, env.input_ids, config.ranks, config.spectral_mode, config.segment_len, per_head=True
        )
        shares = rank_shares(config.ranks, env.head_dim)
        chosen = allocate_ranks(energy.reshape(-1, len(config.ranks)), shares, env.budget_share)
        return np.asarray(chosen).reshape(env.num_layers, -1).tolist()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.625, 0.5], help="logit-FLOPs shares")
    parser.add_argument("--episodes", type=int, default=12, help="test episodes per cell (seeds 10000...)")
    parser.add_argument("--corpus", default="wiki", help="held-out corpus")
    parser.add_argument("--mode", default="joint", help="spectral mode")
    parser.add_argument("--samples", type=int, default=16, help="label samples of the Fisher profiles")
    add_model_options(parser)
    parser.add_argument(
        "--policies",
        nargs="*",
        default=["uniform", "static:fisher", "hindsight:fisher", "hindsight:scaled_delta"],
        help="policy specs evaluated beside delta:raw",
    )
    args = parser.parse_args(argv)
    kwargs = dict(seq_len=args.seq_len, batch_size=1, guardrail="off", per_head=True, spectral_mode=args.mode,
                  model=args.model, ranks=tuple(args.ranks), sensitivity_samples=0)  # fmt: skip
    loaded, ranks = load_causal_lm(args.model), tuple(args.ranks)
    start = time.perf_counter()
    scale = delta_scale(loaded, ranks, args.mode, None, args.seq_len, args.samples, per_head=True)
    print(f"scale (fitted or cached): {time.perf_counter() - start:.0f} s")

    test = sequential_chunks(corpus_tokens(args.corpus, "test", loaded.tokenizer), args.seq_len)[:4]
    for index, batch in enumerate(test.split(1)):
        started = time.perf_counter()
        own = delta_energy_profile(loaded, batch, ranks, args.mode, None, per_head=True)
        seconds = time.perf_counter() - started
        teacher = fisher_kl_profile(loaded, batch, ranks, args.mode, None, args.samples, per_head=True)
        below = teacher[..., :-1].ravel()
        for label, estimate in (("scaled delta", own * scale), ("scale only", scale), ("raw delta", own)):
            rho = np.corrcoef(np.log(estimate[..., :-1].ravel() + 1e-9), np.log(below + 1e-9))[0, 1]
            print(f"test chunk {index}: log-corr with its Fisher profile, {label}: {rho:.3f}")
        print(f"  delta profile {seconds:.1f} s")

    for budget in args.budgets:
        env_kwargs = {**kwargs, "corpus": args.corpus, "flops_budget": budget}
        for policy in [*(make_policy(spec, env_kwargs) for spec in args.policies), RawDeltaAllocation()]:
            started = time.perf_counter()
            row = evaluate_policy(policy, env_kwargs, args.episodes, timing_repeats=0)
            delta_ppl = 100 * (np.exp(row.nll - row.nll_full) - 1)
            print(
                f"budget {budget} {policy.name:24s} KL {row.kl:.5f}  dPPL {delta_ppl:+.2f}%"
                f"  logit FLOPs {row.flops_logits_ratio:.3f}  ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
