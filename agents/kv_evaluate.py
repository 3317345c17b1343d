"""The key-cache task's comparison: policies of DRRL-KVCache-v0 at equal key-cache bytes on held-out prompts.

Every policy (the fixed rules, the teacher and the ceiling of :mod:`oracle.kvcache`, and trained agents) plays the
same episodes: each of the first ``prompts`` prompts of the split at each budget, so every number is the env's own
KL (``-reward``), measured through the compressed cache. Reported per budget and policy:

* the mean per-token KL of the scored continuation from the full model's, and on how many prompts it is below the
  static decode allocation's (the strongest fixed rule);
* the headroom captured ``(KL_static - KL) / (KL_static - KL_hindsight)`` (1: the ceiling, 0: static);
* the key-cache bytes used, as a share of the full key cache's;
* the decision's cost: the FLOPs of the signal the policy computes per prompt (``oracle.kvcache.decision_flops``;
  an agent: the observation's statistics plus its network at every layer) over the FLOPs of generating the scored
  ``horizon`` tokens and over ``generated_tokens`` (the generation the allocation serves in use), and the wall-clock
  of its decisions (the profile it measures included).

As a command (``python -m agents.evaluate --env DRRL-KVCache-v0``, or ``python -m agents.kv_evaluate``) it compares
``--policies`` on the first ``--prompts`` prompts of ``--corpus``'s test split at every ``--budgets`` share and
writes ``table.md`` and ``comparison.csv`` to ``--out``::

    python -m agents.evaluate --env DRRL-KVCache-v0 --policies static hindsight runs/RUN/model.safetensors \
        --context 4096 --prompts 4 --budgets 0.75 0.6 --out results/kv4096
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

from agents.results import write_rows_csv
from agents.zoo import make_policy
from drrl_env.cli import ENV_IDS, add_env_arguments, at_least, env_kwargs
from drrl_env.kvcache import (
    KVCACHE_ENV_ID,
    DRRLKVCacheEnv,
    KVCacheConfig,
    observation_size,
    shared_prompt_states,
)
from drrl_env.lm.corpora import CorpusNotAvailableError
from drrl_env.lm.files import check_output_folder, write_text_atomic
from drrl_env.lm.models import ModelNotAvailableError
from oracle.kvcache import KV_POLICIES, ProfilePolicy, decision_flops, generation_flops, kv_policy, play
from oracle.policy import RankPolicy

GENERATED_TOKENS = 1024
"""tokens of the generation an allocation serves in use, for the decision's cost share (the env scores ``horizon``)"""


@dataclass
class KVRow:
    """One policy at one budget, over the compared prompts."""

    policy: str
    budget: float
    prompts: int
    kl: float
    """mean per-token KL of the scored continuation from the full model's"""
    below_static: int
    """prompts on which the KL is below the static allocation's"""
    headroom_captured: float
    """(KL_static - KL) / (KL_static - KL_hindsight) of the means; NaN without both rows"""
    cache_used: float
    """key-cache bytes over the full key cache's (mean)"""
    decision_share_horizon: float
    """decision FLOPs over the FLOPs of generating the scored tokens (NaN for a ceiling)"""
    decision_share_generation: float
    """decision FLOPs over the FLOPs of generating GENERATED_TOKENS tokens"""
    decision_ms: float
    """wall-clock of the policy's decisions per prompt, its signal included"""
    mean_rank: float
    kls: list[float] = field(default_factory=list)
    ranks: list[list[int]] = field(default_factory=list)


class _TimedPolicy:
    """``policy`` with the wall-clock of its ``act`` calls summed in ``seconds``."""

    def __init__(self, policy: RankPolicy) -> None:
        self.policy, self.name, self.seconds = policy, policy.name, 0.0

    def reset(self, seed: int) -> None:
        self.policy.reset(seed)

    def act(self, observation: np.ndarray, action_mask: np.ndarray, env: DRRLKVCacheEnv) -> Any:
        started = time.perf_counter()
        action = self.policy.act(observation, action_mask, env)
        self.seconds += time.perf_counter() - started
        return action


def check_kv_spec(spec: str, option: str) -> None:
    """Refuse, before any work, a spec of DRRL-KVCache-v0 that is neither a rule of ``oracle.kvcache`` nor a file.

    ``option`` names the command's option, for the one-line ``ValueError``.
    """
    if spec not in KV_POLICIES and not Path(spec).is_file():
        raise ValueError(f"{option} {spec!r}: expected an agent file or one of {KV_POLICIES}")


def make_kv_policy(spec: str, env_kwargs: dict[str, Any], seed: int = 0, trust_pickle: bool = False) -> RankPolicy:
    """A policy of DRRL-KVCache-v0 from its spec: a rule of ``oracle.kvcache`` by name, or an agent file.

    ``trust_pickle``: as :func:`agents.zoo.make_policy` (an SB3 ``.zip`` loads only with it).
    """
    return kv_policy(spec, seed) if spec in KV_POLICIES else make_policy(spec, env_kwargs, trust_pickle)


def policy_decision_flops(env: DRRLKVCacheEnv, policy: RankPolicy) -> float:
    """FLOPs of ``policy``'s decision per prompt: a rule of :data:`KV_POLICIES` by name, else an agent.

    An agent sees the observation (:meth:`DRRLKVCacheEnv.observation_flops`) and runs its network once per layer
    (``flops_per_decision``, e.g. :attr:`agents.algorithms.ModelPolicy.flops_per_decision`).
    """
    if policy.name in KV_POLICIES:
        return decision_flops(env, policy.name)
    return env.observation_flops() + env.num_layers * float(getattr(policy, "flops_per_decision", 0.0))


OBSERVATION_OPTIONS = ("static_prior", "attention_kl")
"""the env options that add to DRRL-KVCache-v0's observation"""


def observation_options(policy: RankPolicy, candidates: int) -> dict[str, bool] | None:
    """The observation options an agent was trained with (:data:`OBSERVATION_OPTIONS`), read from its input's size.

    None for a rule, or an agent whose size matches no setting (its first action then says what it expected).
    """
    space = getattr(getattr(policy, "policy", None), "observation_space", None)
    if space is None or not getattr(space, "shape", None):
        return None
    setup = getattr(policy, "setup", None)
    size = space.shape[-1] - (1 if getattr(setup, "history", 0) else 0)  # a state window adds a validity column
    for prior, attention in itertools.product((False, True), repeat=2):
        if observation_size(candidates, prior, attention) == size:
            return {"static_prior": prior, "attention_kl": attention}
    return None


@contextlib.contextmanager
def policy_envs(kwargs: dict[str, Any]) -> Iterator[Callable[[RankPolicy], DRRLKVCacheEnv]]:
    """``env_of(policy)``: the env of ``kwargs`` with the observation options ``policy`` was trained with.

    An agent gets an env with its options (:func:`observation_options`), a rule the one ``kwargs`` say; each env is
    made once, when a policy first needs it. The envs share the prompts' states
    (:func:`drrl_env.kvcache.shared_prompt_states`) and are closed when the block ends.
    """
    candidates = len(KVCacheConfig.from_kwargs(dict(kwargs)).ranks)
    envs: dict[tuple[bool, ...], DRRLKVCacheEnv] = {}

    def env_of(policy: RankPolicy) -> DRRLKVCacheEnv:
        options = observation_options(policy, candidates) or {}
        settings = {name: bool(kwargs.get(name, False)) for name in OBSERVATION_OPTIONS} | options
        key = tuple(settings[name] for name in OBSERVATION_OPTIONS)
        if key not in envs:
            envs[key] = gym.make(KVCACHE_ENV_ID, **{**kwargs, **settings}).unwrapped
        return envs[key]

    with shared_prompt_states():
        try:
            yield env_of
        finally:
            for env in envs.values():
                env.close()


def kv_comparison(
    policies: Sequence[RankPolicy],
    env_kwargs: dict[str, Any],
    prompts: int,
    budgets: Sequence[float],
    split: str = "test",
    generated_tokens: int = GENERATED_TOKENS,
    progress: bool = True,
) -> list[KVRow]:
    """Play every policy on the first ``prompts`` prompts of ``split`` at every budget (module docstring).

    ``env_kwargs``: ``gym.make("DRRL-KVCache-v0")`` keywords (the pool, split, budget and kept prompts are set
    here: every compared prompt is kept, so its prefill runs once for all policies and budgets). An agent trained
    with other observation options (:func:`observation_options`) plays in an env with its options, which shares
    the prompts' states (:func:`policy_envs`).
    """
    kwargs = {**env_kwargs, "split": split, "prompts": prompts, "cached_prompts": prompts}
    kwargs["cache_budget"] = (min(budgets), max(budgets))
    with policy_envs(kwargs) as env_of:
        return _compare(policies, env_of, prompts, budgets, generated_tokens, progress)


def _compare(
    policies: Sequence[RankPolicy],
    env_of: Callable[[RankPolicy], DRRLKVCacheEnv],
    prompts: int,
    budgets: Sequence[float],
    generated_tokens: int,
    progress: bool,
) -> list[KVRow]:
    """:func:`kv_comparison`'s episodes and rows, each policy in the env ``env_of`` gives it."""
    timed = [_TimedPolicy(policy) for policy in policies]
    kls = {(budget, policy.name): [] for budget in budgets for policy in timed}
    used = {key: [] for key in kls}
    ranks = {key: [] for key in kls}
    for policy in policies:  # the static profile is measured once on validation text, not per decision: not timed
        if isinstance(policy, ProfilePolicy) and policy.name == "static":
            env = env_of(policy)
            env.reset(seed=0, options={"prompt": 0})
            policy.profile(env)
    bar = tqdm(total=prompts * len(budgets) * len(timed), desc="key-cache comparison", disable=not progress)
    for prompt in range(prompts):
        for budget in budgets:
            for policy in timed:
                env = env_of(policy.policy)
                observation, _ = env.reset(seed=prompt, options={"prompt": prompt, "budget": budget})
                info = play(env, policy, observation, seed=prompt)
                kls[budget, policy.name].append(info["kl"])
                used[budget, policy.name].append(info["budget_used"])
                ranks[budget, policy.name].append(info["ranks"])
                bar.update()
    bar.close()
    rows = []
    for budget in budgets:
        static = np.asarray(kls.get((budget, "static"), [np.nan] * prompts))
        ceiling = np.asarray(kls.get((budget, "hindsight"), [np.nan] * prompts))
        gap = static.mean() - ceiling.mean()
        for policy in timed:
            env = env_of(policy.policy)
            horizon_flops, generation = generation_flops(env), generation_flops(env, generated_tokens)
            values = np.asarray(kls[budget, policy.name])
            cost = policy_decision_flops(env, policy.policy)
            rows.append(
                KVRow(
                    policy.name,
                    budget,
                    prompts,
                    float(values.mean()),
                    int((values < static).sum()) if policy.name != "static" else 0,
                    float((static.mean() - values.mean()) / gap) if gap > 0 else float("nan"),
                    float(np.mean(used[budget, policy.name])),
                    cost / horizon_flops,
                    cost / generation,
                    1e3 * policy.seconds / (prompts * len(budgets)),
                    float(np.mean(ranks[budget, policy.name])),
                    values.tolist(),
                    ranks[budget, policy.name],
                )  # fmt: skip
            )
    return rows


def kv_markdown_table(rows: Sequence[KVRow], env_kwargs: dict[str, Any], split: str = "test") -> str:
    """The comparison as markdown, with a header line that says what was compared."""
    first = rows[0]
    lines = [
        f"{KVCACHE_ENV_ID}: {first.prompts} {env_kwargs['corpus']} {split} prompts of {env_kwargs['context']} tokens, "
        f"{env_kwargs['observe_tokens']} observed, {env_kwargs['horizon']} scored; KL per token from the full model; "
        f"decision cost in FLOPs over generating the {env_kwargs['horizon']} scored / {GENERATED_TOKENS} tokens",
        "",
        "| budget | policy | mean KL | below static | headroom captured | key cache | decision cost | decision ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cost = (
            "- (ceiling)"
            if np.isnan(row.decision_share_horizon)
            else f"{100 * row.decision_share_horizon:.2g} % / {100 * row.decision_share_generation:.2g} %"
        )
        below = "-" if row.policy == "static" else f"{row.below_static}/{row.prompts}"
        lines.append(
            f"| {row.budget:g} | {row.policy} | {row.kl:.5f} | {below} | {row.headroom_captured:+.2f} | "
            f"{row.cache_used:.3f} | {cost} | {row.decision_ms:.0f} |"
        )
    return "\n".join(lines)


def write_kv_csv(rows: Sequence[KVRow], path: str | Path) -> None:
    """Every field of every row (per-prompt KLs and ranks as space-separated lists), written atomically."""
    write_rows_csv(rows, [f.name for f in dataclasses.fields(KVRow)], path)


DEFAULT_KV_POLICIES = ("uniform", "static", "energy", "logit_error", "self_profile", "hindsight")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m agents.evaluate --env DRRL-KVCache-v0",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--policies",
        nargs="+",
        default=list(DEFAULT_KV_POLICIES),
        help=f"rules of oracle.kvcache ({', '.join(KV_POLICIES)}) and agent files; include static and hindsight "
        f"for the headroom column (default: {' '.join(DEFAULT_KV_POLICIES)})",
    )
    parser.add_argument(
        "--budgets", nargs="+", type=float, default=[0.75, 0.6], help="key-cache shares compared (default: 0.75 0.6)"
    )
    parser.add_argument("--trust-pickle", action="store_true", help="allow SB3 .zip agents (pickles) in --policies")
    parser.add_argument("--out", default="results/kvcache", help="folder of table.md and comparison.csv")
    parser.add_argument(
        "--generated-tokens",
        type=at_least(1),
        default=GENERATED_TOKENS,
        help=f"the generation a decision serves, for its cost share (default: {GENERATED_TOKENS})",
    )
    # the compared prompts: the first --prompts of --corpus's test split, of --context tokens
    add_env_arguments(parser, KVCACHE_ENV_ID, ENV_IDS, split="test", prompts=4)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    kwargs = env_kwargs(vars(args))
    try:
        for spec in args.policies:
            check_kv_spec(spec, "--policies")
        for budget in args.budgets:
            if not 0 < budget <= 1:
                raise ValueError(f"--budgets {budget}: expected a share of the key cache in (0, 1]")
        out = check_output_folder(args.out, "--out")
        policies = [make_kv_policy(spec, kwargs, 0, args.trust_pickle) for spec in args.policies]
        budgets = sorted(set(args.budgets), reverse=True)
        rows = kv_comparison(policies, kwargs, kwargs["prompts"], budgets, kwargs["split"], args.generated_tokens)
    except (ValueError, FileNotFoundError, ModelNotAvailableError, CorpusNotAvailableError) as error:
        print(f"error: {str(error).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    table = kv_markdown_table(rows, kwargs, kwargs["split"])
    write_text_atomic(out / "table.md", table + "\n")
    write_kv_csv(rows, out / "comparison.csv")
    print(table + f"\n\nwrote {out}/table.md and {out}/comparison.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
