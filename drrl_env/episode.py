"""One episode of DRRL-Attention-v0: the paused forward pass, its masks, rewards and record.

The env (``drrl_env.env``) is the Gymnasium face of this class: it validates actions and builds
observations; everything an episode decides (which rank runs, what it costs, what it earns)
happens here, in the order of the MDP: masks of the step -> executed rank -> low-rank output
replaces the full one -> reward terms -> the next step's call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from drrl_env.attention.flops import AttentionFlops, full_attention_flops, low_rank_attention_flops
from drrl_env.attention.hook import AttentionCall, AttentionHook
from drrl_env.config import ENV_ID, EnvConfig
from drrl_env.credit import CompletionCredit, additive_plan_kl
from drrl_env.guardrail import (
    FlopsBudget,
    LogitErrors,
    combine_masks,
    guardrail_mask,
    nearest_allowed,
    transition_energies,
    truncation_errors,
)
from drrl_env.lm.models import LoadedModel
from drrl_env.lm.runner import SteppedForward
from drrl_env.lm.scoring import next_token_kl, next_token_scores, replay_logits
from drrl_env.reward import attention_output_similarity, eq13_terms, kl_terminal_reward, residual_deviation

RECORD_VERSION = 1


@dataclass
class ReferencePass:
    """A full-rank forward pass over the episode's batch: each step's attention input and the logits."""

    hidden: dict[tuple[int, int], torch.Tensor | None]
    logits: torch.Tensor

    @classmethod
    def run(
        cls, loaded: LoadedModel, hook: AttentionHook, batch: torch.Tensor, segment_len: int | None
    ) -> ReferencePass:
        hidden: dict[tuple[int, int], torch.Tensor | None] = {}

        def record(call: AttentionCall) -> torch.Tensor:
            hidden[(call.layer, call.segment)] = call.hidden_states
            return call.full()  # exactly what a step at rank d sends on

        with torch.no_grad(), hook.use(record, segment_len):
            logits = loaded.model(input_ids=batch).logits  # (B, n, V)
        return cls(hidden, logits)

    def rows(self, start: int, stop: int) -> ReferencePass:
        """The pass of batch rows ``start:stop`` alone (one episode of a batched pass)."""
        hidden = {key: None if value is None else value[start:stop] for key, value in self.hidden.items()}
        return ReferencePass(hidden, self.logits[start:stop])


@dataclass(frozen=True)
class EpisodeStart:
    """What a reset draws before the forward pass starts: the batch, its budget share, the seed that replays it."""

    batch: torch.Tensor
    share: float
    episode_seed: int
    sensitivity_seconds: float


@dataclass(frozen=True)
class CandidateRewards:
    """Eq. 13 reward and its terms for every candidate rank of one step, each ``(K,)``.

    Attributes:
        ranks: the candidate ranks (the action ``k`` is ``ranks[k]``).
        allowed: the action mask (for every key/value group).
        reward: ``alpha * fidelity - beta * flops_ratio - gamma * perturbation``.
        fidelity: Eq. 8 output similarity.
        flops_ratio: low-rank attention FLOPs (overheads included) over full attention's.
        perturbation: relative logit perturbation of the transition from the previous rank.
    """

    ranks: np.ndarray
    allowed: np.ndarray
    reward: np.ndarray
    fidelity: np.ndarray
    flops_ratio: np.ndarray
    perturbation: np.ndarray


@dataclass(frozen=True)
class StepOutcome:
    reward: float
    terminated: bool
    info: dict[str, Any]


@dataclass(frozen=True)
class _Evaluated:
    """What ``K`` rank choices of one step give: outputs ``(K, B, Hq, m, d)`` and per-choice terms ``(K,)``."""

    output: torch.Tensor
    fidelity: torch.Tensor
    flops: list[AttentionFlops]
    flops_full: AttentionFlops
    flops_ratio: torch.Tensor
    perturbation: torch.Tensor


@dataclass
class Episode:
    """The state of one episode; ``call`` is the pending attention call (None once it has ended)."""

    config: EnvConfig
    loaded: LoadedModel
    hook: AttentionHook
    batch: torch.Tensor
    budget: FlopsBudget
    reference: ReferencePass | None
    epsilon: float
    episode_seed: int
    guardrail_step: int
    num_segments: int
    baseline_ranks: list | None = None
    """the fixed allocation the 'reference' / 'waterfill' kl baselines score on this batch: a rank per layer, or a
    list of ranks per key/value group per layer"""
    sensitivity: np.ndarray | None = None
    """the batch's sensitivity profile (what ``kl_credit="completion"`` water-fills the rest of the budget over)"""
    runner: Any = None
    """the forward pass the episode steps: its own :class:`SteppedForward` (None: started here), or its rows of a
    shared one (``drrl_env.vector``)"""
    call: AttentionCall | None = field(init=False)
    steps: list[dict[str, Any]] = field(init=False, default_factory=list)
    final: dict[str, Any] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        shape = self.loaded.attention_shape
        self.kv_heads, self.head_dim = shape.kv_heads, shape.head_dim
        self.candidate_ranks = torch.tensor(self.config.ranks, dtype=torch.int64)
        self.step_index = 0
        self.previous_ranks = torch.full((self.kv_heads,), self.head_dim, dtype=torch.int64)
        self.history: list[list[Any]] = [[None] * self.num_segments for _ in range(shape.num_layers)]
        if self.runner is None:
            self.runner = SteppedForward(
                self.loaded.model,
                self.hook,
                self.batch,
                self.config.segment_len,
                keep_logits=self.reference is not None,
            )
        self.call = self.runner.start()
        self.deviation = self._deviation()
        self.credit: CompletionCredit | None = None
        if self.config.reward_kind == "kl" and self.config.kl_credit != "terminal":
            exact = self.config.kl_credit == "completion"
            self.credit = CompletionCredit(
                self.sensitivity,
                self.config.ranks,
                self.head_dim,
                list(self.baseline_ranks),
                self._plan_kl if exact else partial(additive_plan_kl, self.sensitivity, self.config.ranks),
                self.config.kl_baseline,
                exact,
            )
        self._prepare()

    # ----------------------------------------------------------------- masks
    def _prepare(self) -> None:
        """The step's logit errors and masks (budget, guardrail, both)."""
        cfg, call = self.config, self.call
        self.transition: LogitErrors = transition_energies(
            call, self.previous_ranks, self.candidate_ranks, cfg.spectral_mode
        )
        self.truncation: LogitErrors | None = (
            truncation_errors(call, self.candidate_ranks, cfg.spectral_mode) if cfg.guardrail == "exact" else None
        )
        self.budget_mask = self.budget.mask(self.step_index)
        self._update_mask()

    def _update_mask(self) -> None:
        cfg = self.config
        if cfg.guardrail == "off":
            guard = torch.ones(len(cfg.ranks), self.kv_heads, dtype=torch.bool)
        else:
            errors = self.truncation if cfg.guardrail == "exact" else self.transition
            relative = errors.relative(per_group=cfg.per_head).cpu()
            relative = relative if cfg.per_head else relative.unsqueeze(-1).expand(-1, self.kv_heads)
            guard = guardrail_mask(relative, self.epsilon)
        self.guardrail_mask = guard
        self.mask = combine_masks(guard, self.budget_mask)

    def flat_mask(self) -> np.ndarray:
        """The step's mask as actions see it: ``(K,)``, or ``(Hkv * K,)`` group-major with per-head ranks."""
        mask = self.mask.numpy()
        return mask.T.reshape(-1).copy() if self.config.per_head else mask[:, 0].copy()

    def set_epsilon(self, epsilon: float, guardrail_step: int) -> None:
        self.epsilon, self.guardrail_step = epsilon, guardrail_step
        if self.call is not None:
            self._update_mask()

    # ----------------------------------------------------------------- a step
    def _execute(self, requested: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The candidate indices that run for ``requested (Hkv,)``, and whether the request was not allowed."""
        chosen, violation = requested.clone(), False
        for group in range(self.kv_heads):
            if not bool(self.mask[requested[group], group]):
                violation = True
                target = float(self.candidate_ranks[requested[group]])
                chosen[group] = nearest_allowed(target, self.mask[:, group].numpy(), self.config.ranks)
        while not self.budget.fits(self.step_index, self.candidate_ranks[chosen]):  # per-head ranks only
            violation = True
            group = int(torch.argmax(chosen))
            chosen[group] = int(torch.nonzero(self.budget_mask[: chosen[group], group]).max())
        return chosen, violation

    def _evaluate(self, choices: torch.Tensor) -> _Evaluated:
        """Low-rank outputs and Eq. 13 terms of ``choices (K, Hkv)`` (candidate indices), batched over ``K``."""
        cfg, call = self.config, self.call
        shape = self.loaded.attention_shape
        ranks = self.candidate_ranks[choices]  # (K, Hkv)
        low = call.low_rank(ranks, cfg.spectral_mode)  # (K, B, Hq, m, d)
        fidelity = attention_output_similarity(call.full(), low)  # (K,)
        batch, q_heads, m, _ = call.query.shape
        n = call.key.shape[-2]
        flops = [
            low_rank_attention_flops(batch, q_heads, shape.kv_heads, m, n, shape.head_dim, row, cfg.spectral_mode)
            for row in ranks
        ]
        flops_full = full_attention_flops(batch, q_heads, m, n, shape.head_dim)
        flops_ratio = torch.tensor([f.total / flops_full.total for f in flops], dtype=torch.float64)
        perturbation = torch.tensor([self.transition.relative_of(row) for row in choices], dtype=torch.float64)
        return _Evaluated(low, fidelity, flops, flops_full, flops_ratio, perturbation)

    def _deviation(self) -> float:
        if self.call is None or self.reference is None:
            return 0.0
        reference = self.reference.hidden.get((self.call.layer, self.call.segment))
        return residual_deviation(self.call.hidden_states, reference)

    def step(self, requested: torch.Tensor) -> StepOutcome:
        """Run the step with candidate indices ``requested (Hkv,)``; advance to the next call."""
        output = self.decide(requested)
        return self.complete(self.runner.send(output))

    def decide(self, requested: torch.Tensor) -> torch.Tensor:
        """The first half of :meth:`step`: the attention output for ``requested (Hkv,)``, to continue the forward with.

        A vector env (``drrl_env.vector``) runs this for each of its episodes, continues their shared forward pass
        once, and hands each episode its rows of the next call through :meth:`complete`.
        """
        cfg, call = self.config, self.call
        chosen, violation = self._execute(requested)
        ranks = self.candidate_ranks[chosen]  # (Hkv,)
        evaluated = self._evaluate(chosen.unsqueeze(0))
        fidelity, flops_ratio, perturbation = (
            float(evaluated.fidelity[0]),
            float(evaluated.flops_ratio[0]),
            float(evaluated.perturbation[0]),
        )
        self.budget.spent += self.budget.cost(self.step_index, ranks)
        per_head = cfg.per_head
        rank_value: int | list[int] = [int(r) for r in ranks] if per_head else int(ranks[0])
        flops, flops_full = evaluated.flops[0], evaluated.flops_full
        info: dict[str, Any] = {
            "rank": rank_value,
            "requested_rank": [int(self.candidate_ranks[i]) for i in requested]
            if per_head
            else int(self.candidate_ranks[requested[0]]),
            "layer": call.layer,
            "segment": call.segment,
            "flops": flops.total,
            "flops_core": flops.core,
            "flops_logits": flops.logits,
            "flops_full": flops_full.total,
            "flops_logits_full": flops_full.logits,
            "fidelity": fidelity,
            "perturbation": perturbation,
            "epsilon": self.epsilon,
            "mask_before": self.flat_mask(),
            "guardrail_mask_rate": 1.0 - float(self.guardrail_mask.double().mean()),
            "budget_mask_rate": 1.0 - float(self.budget_mask.double().mean()),
            "masked_violation": violation,
            "budget": self.budget.share,
            "budget_used": self.budget.used_share,
        }
        if self.truncation is not None:
            info["logit_error"] = self.truncation.relative_of(chosen)
        violation_term = -cfg.violation_penalty if violation else 0.0
        self.history[call.layer][call.segment] = rank_value
        self.previous_ranks = ranks.clone()
        self.step_index += 1
        self._decided = (call, info, requested, rank_value, fidelity, flops_ratio, perturbation, violation_term)
        return evaluated.output[0]

    def complete(self, next_call: AttentionCall | None) -> StepOutcome:
        """The second half of :meth:`step`, given the forward pass's next call (None: it has finished)."""
        cfg = self.config
        call, info, requested, rank_value, fidelity, flops_ratio, perturbation, violation_term = self._decided
        self.call = next_call
        terminated = self.call is None
        if cfg.reward_kind == "kl":
            previous_deviation, self.deviation = self.deviation, self._deviation()  # 0 at the terminal state
            shaping = cfg.kl_shaping_weight * (previous_deviation - self.deviation)  # Phi_{t+1} - Phi_t
            terms = {"shaping": shaping, "violation": violation_term}
            if self.credit is not None and not terminated:
                terms["credit"] = self.credit.step(call.layer, rank_value, self.budget.left_share(self.step_index))
        else:
            terms = eq13_terms(fidelity, flops_ratio, perturbation, cfg.alpha, cfg.beta, cfg.gamma)
            terms["violation"] = violation_term
        terms["terminal"] = 0.0
        info["deviation"] = self.deviation
        if terminated:
            self._finish(info, terms)
        else:
            self._prepare()
        reward = float(sum(terms.values()))
        info["reward_terms"] = terms
        self.steps.append(
            {"action": [int(i) for i in requested], "rank": rank_value, "reward": reward, "reward_terms": dict(terms)}
        )
        return StepOutcome(reward, terminated, info)

    def _finish(self, info: dict[str, Any], terms: dict[str, float]) -> None:
        """The terminal step: KL and LM losses against the reference pass, and the reward they give."""
        cfg = self.config
        self.final = {"budget_used": self.budget.used_share}
        if self.reference is not None:
            scores = next_token_scores(self.reference.logits, self.runner.logits, self.batch)
            self.final.update(kl=scores.kl, lm_loss=scores.lm_loss, lm_loss_full=scores.lm_loss_full)
            if cfg.reward_kind == "kl":
                if self.credit is not None:  # the return was paid step by step (drrl_env.credit)
                    teacher_kl = None if self.credit.exact else self._fixed_rule_kl("waterfill")
                    terms["credit"] = self.credit.finish(self.final["kl"], teacher_kl)
                    self.final.update(
                        kl_waterfill=self.credit.initial_kl if teacher_kl is None else teacher_kl,
                        credit_forwards=self.credit.forwards,
                    )
                else:
                    rule = cfg.kl_baseline.removesuffix("_log_ratio")
                    if rule != "none":
                        self.final[f"kl_{rule}"] = self._fixed_rule_kl(rule)
                    terms["terminal"] = kl_terminal_reward(
                        self.final["kl"], self.final.get(f"kl_{rule}"), cfg.kl_baseline
                    )
            else:
                terms["terminal"] = cfg.terminal_lm_weight * (self.final["lm_loss_full"] - self.final["lm_loss"])
        info.update(self.final)
        self.runner.logits = None  # free the (B, n, V) logits

    def _fixed_rule_kl(self, rule: str) -> float:
        """KL from the full model on this batch of a fixed allocation ("uniform", "reference" or "waterfill").

        ``"uniform"``: every step at the largest candidate rank within the budget; otherwise the episode's
        ``baseline_ranks`` (the config's ``reference_ranks``, or the water-fill of the episode's sensitivity profile).
        """
        if rule == "uniform":
            return self._plan_kl([self.budget.uniform_rank()] * self.loaded.attention_shape.num_layers)
        if self.baseline_ranks is None:
            raise ValueError(f"kl baseline {rule!r} needs the episode's baseline_ranks")
        return self._plan_kl(self.baseline_ranks)

    def _plan_kl(self, plan: list) -> float:
        """KL from the full model on this batch of ``plan``: a rank per layer, or a list of group ranks per layer."""
        # LayerRanks reads a list as per-segment ranks and a tensor as one rank per key/value group
        ranks = [rank if isinstance(rank, int) else torch.as_tensor(rank) for rank in plan]
        logits = replay_logits(self.loaded, self.batch, ranks, self.config.spectral_mode, self.config.segment_len)
        return next_token_kl(self.reference.logits, logits)

    def candidates(self) -> CandidateRewards:
        """Eq. 13 reward of every candidate at the current step, in one batched pass (nothing changes)."""
        cfg = self.config
        table = torch.arange(len(cfg.ranks)).unsqueeze(1).expand(-1, self.kv_heads)  # (K, Hkv)
        evaluated = self._evaluate(table)
        terms = [
            eq13_terms(float(f), float(c), float(p), cfg.alpha, cfg.beta, cfg.gamma)
            for f, c, p in zip(evaluated.fidelity, evaluated.flops_ratio, evaluated.perturbation, strict=True)
        ]
        return CandidateRewards(
            ranks=np.asarray(cfg.ranks),
            allowed=self.mask.all(dim=1).numpy(),
            reward=np.array([sum(t.values()) for t in terms]),
            fidelity=evaluated.fidelity.numpy(),
            flops_ratio=evaluated.flops_ratio.numpy(),
            perturbation=evaluated.perturbation.numpy(),
        )

    def record(self) -> dict[str, Any]:
        """The episode record (CompilerGym-style): what replays it, and what it gave."""
        return {
            "version": RECORD_VERSION,
            "env_id": ENV_ID,
            "config": self.config.to_json(),
            "episode_seed": self.episode_seed,
            "guardrail_step": self.guardrail_step,
            "budget": self.budget.share,
            "steps": list(self.steps),
            "terminated": bool(self.final),
            **self.final,
        }

    def abort(self) -> None:
        self.runner.abort()
        self.call = None
