"""Is a forward-only per-input signal enough? The output-delta profile against the Fisher one, per head.

The per-head Fisher profile (``drrl_env.sensitivity.fisher_kl_profile``) costs one forward and ``S``
backward passes per input. Its per-cell estimate is ``0.5 E[(g . delta)^2]``; with the gradient ``g``
taken as independent of the truncation error ``delta``, that is ``delta``'s energy times a scale that
depends on the unit, not the input. This script measures that approximation: each input's output-delta
energy (:func:`drrl_env.sensitivity.delta_energy_profile`, one forward pass, no backward) times a
per-cell scale calibrated on validation text (Fisher / delta energy, both averaged there), water-filled
at the episode's budget like the hindsight oracle; beside uniform, static:fisher and hindsight:fisher,
on the same held-out episodes at equal logit FLOPs.

    python scripts/delta_signal.py --budgets 0.625 0.5 --episodes 12
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from agents.evaluate import evaluate_policy
from agents.zoo import make_policy
from drrl_env.config import DEFAULT_RANKS
from drrl_env.corpora import corpus_tokens, sequential_chunks
from drrl_env.models import load_causal_lm
from drrl_env.sensitivity import delta_energy_profile, fisher_kl_profile
from oracle.hindsight import LayerAllocationPolicy, allocate_ranks, rank_shares


class DeltaAllocation(LayerAllocationPolicy):
    """Water-fill of ``scale * delta_energy(input)``, one forward per input (``scale`` None: the raw energy)."""

    def __init__(self, scale: np.ndarray | None, name: str) -> None:
        super().__init__()
        self.scale, self._name = scale, name

    @property
    def name(self) -> str:
        return self._name

    def allocate(self, env) -> list:
        config = env.config
        energy = delta_energy_profile(
            env.loaded, env.input_ids, config.ranks, config.spectral_mode, config.segment_len, per_head=True
        )
        cost = energy if self.scale is None else energy * self.scale
        shares = rank_shares(config.ranks, env.head_dim)
        chosen = allocate_ranks(cost.reshape(-1, len(config.ranks)), shares, env.budget_share)
        return np.asarray(chosen).reshape(env.num_layers, -1).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.625, 0.5], help="logit-FLOPs shares")
    parser.add_argument("--episodes", type=int, default=12, help="test episodes per cell (seeds 10000...)")
    parser.add_argument("--corpus", default="wiki", help="held-out corpus")
    parser.add_argument("--mode", default="joint", help="spectral mode")
    parser.add_argument("--validation-tokens", type=int, default=2048, help="validation tokens of the calibration")
    parser.add_argument("--policies", nargs="*", default=["uniform", "static:fisher", "hindsight:fisher"])
    args = parser.parse_args()
    kwargs = dict(seq_len=128, batch_size=1, guardrail="off", per_head=True, spectral_mode=args.mode)
    loaded = load_causal_lm()
    ranks = DEFAULT_RANKS
    start = time.perf_counter()
    chunks = sequential_chunks(corpus_tokens("wiki", "validation", loaded.tokenizer), 128, args.validation_tokens)
    fisher = np.zeros(1)
    energy = np.zeros(1)
    for batch in chunks.split(4):
        fisher = fisher + fisher_kl_profile(loaded, batch, ranks, args.mode, None, 16, per_head=True) * len(batch)
        energy = energy + delta_energy_profile(loaded, batch, ranks, args.mode, None, per_head=True) * len(batch)
    fisher, energy = fisher / len(chunks), energy / len(chunks)
    scale = np.divide(fisher, energy, out=np.zeros_like(fisher), where=energy > 0)
    print(f"calibration on {len(chunks)} validation chunks: {time.perf_counter() - start:.0f} s")
    for layer in range(0, scale.shape[0], 10):
        print(f"  layer {layer} scale per group (middle candidate):", np.round(scale[layer, :, len(ranks) // 2], 4).tolist())

    # agreement with each test input's own Fisher profile (the 16-sample teacher's signal)
    test = sequential_chunks(corpus_tokens(args.corpus, "test", loaded.tokenizer), 128)[:4]
    for index, batch in enumerate(test.split(1)):
        started = time.perf_counter()
        own = delta_energy_profile(loaded, batch, ranks, args.mode, None, per_head=True)
        seconds = time.perf_counter() - started
        teacher = fisher_kl_profile(loaded, batch, ranks, args.mode, None, 16, per_head=True)
        below = teacher[..., :-1].ravel()
        for label, estimate in (("delta x scale", own * scale), ("scale only", fisher), ("raw delta", own)):
            rho = np.corrcoef(np.log(estimate[..., :-1].ravel() + 1e-9), np.log(below + 1e-9))[0, 1]
            print(f"test chunk {index}: log-corr with its Fisher profile, {label}: {rho:.3f}")
        print(f"  delta profile {seconds:.1f} s")

    for budget in args.budgets:
        env_kwargs = {**kwargs, "corpus": args.corpus, "flops_budget": budget}
        policies = [make_policy(spec, env_kwargs) for spec in args.policies]
        policies += [DeltaAllocation(scale, "delta:fisher-scaled"), DeltaAllocation(None, "delta:raw")]
        for policy in policies:
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
