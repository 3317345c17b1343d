"""The DRRL-Attention envs: choose the rank of each layer's (or head's) low-rank attention in a real LM."""

from __future__ import annotations

import time
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from drrl_env.actions import action_indices
from drrl_env.attention.flops import (
    attended_pairs,
    candidate_attention_flops,
    scaled_delta_profile_flops,
    sensitivity_profile_flops,
)
from drrl_env.attention.hook import AttentionCall, install, segment_spans
from drrl_env.config import DEFAULT_RANKS, EnvConfig
from drrl_env.episode import CandidateRewards, Episode, EpisodeStart, ReferencePass, StepOutcome
from drrl_env.features import ObservationLayout, SequenceDynamics, candidate_ner, layer_weight_statistics
from drrl_env.guardrail import FlopsBudget, guardrail_threshold, truncation_errors
from drrl_env.lm.corpora import corpus_tokens, sample_batch
from drrl_env.lm.models import LoadedModel, load_causal_lm, resolve_device
from drrl_env.profiles.calibration import attach_calibration
from drrl_env.profiles.delta_scale import estimated_profile
from drrl_env.profiles.sensitivity import sensitivity_features
from drrl_env.profiles.waterfill import rank_shares, waterfill_plan
from drrl_env.render import rank_grid, rank_heatmap_rgb, rank_table_ansi

__all__ = ["DEFAULT_RANKS", "CandidateRewards", "DRRLAttentionEnv", "EnvConfig", "rank_heatmap_rgb"]


class DRRLAttentionEnv(gym.Env[np.ndarray, Any]):
    """Rank selection for low-rank attention in a real causal LM, one layer (and segment) per step.

    ## Description
    An episode is one forward pass of the LM over a batch of ``batch_size`` sequences of
    ``seq_len`` tokens drawn from a corpus split. Steps walk the layers in order and, when
    ``segment_len`` T < n, the query segments of each layer (paper IV.E: the rank of a segment
    applies to its queries against all keys so far). At each step the agent picks the rank of the
    current layer/segment; the low-rank attention output then *replaces* the full one in the
    forward pass, so later layers see its effect. The forward pass is paused between steps
    (``drrl_env.lm.runner``), so a step costs about one layer.

    ## Action Space
    ``Discrete(K)``: an index into the sorted candidate ranks ``ranks`` (default 16..64 by 8).
    With ``per_head=True``: ``MultiDiscrete([K] * Hkv)``, one rank per key/value head group. An
    out-of-range index, a wrong shape or a NaN raises ``ValueError``. A masked rank is executed
    as the nearest allowed rank (``drrl_env.guardrail.nearest_allowed``, ties: the larger), with
    ``info["masked_violation"]`` True and ``violation_penalty`` subtracted. With per-head ranks a
    joint choice over budget is lowered, largest group first, until it fits (also a violation).

    ## Observation Space
    ``Box(-10, 10, (D,), float32)``: sequence dynamics, weight statistics, previous rank, NER of
    every candidate, the budget and the share of it left, and context (depth, segment,
    ``eps_t / eps0``), and with ``sensitivity_samples > 0`` what each candidate rank costs on this
    input (its Fisher profile, ``drrl_env.profiles.sensitivity``, or with ``sensitivity_estimate="scaled_delta"`` its
    output-change energy times a scale fitted on validation text, ``drrl_env.profiles.delta_scale``);
    ``drrl_env.features.ObservationLayout``
    documents each part and ``env.observation_slices`` says where it lies.

    ## Rewards
    ``reward="kl"`` (the default under a budget): the return of an episode is ``-KL``, the mean
    per-token KL of the next-token distribution from the full model's on the episode's batch,
    given at the last step; every step also gets a potential-based shaping term that sums to 0
    over the episode (``drrl_env.reward``); ``kl_baseline`` scores the terminal term against a fixed allocation's KL
    on the same batch (uniform ranks, ``reference_ranks``, or ``"waterfill"``: the water-fill of the episode's own
    sensitivity profile, i.e. its hindsight teacher); with that baseline ``kl_credit="completion"`` pays the same
    return step by step, each step what it changes in the KL of its teacher-completed plan (``drrl_env.credit``), and
    ``kl_credit="model"`` the same with the KL of a plan from the profile's additive model (no forward pass; the
    last step pays the rest of the return).
    ``reward="eq13"`` (the default without a budget): the
    paper's per-step ``alpha * sim - beta * FLOPs(r_t) - gamma * ||dA||``, plus
    ``terminal_lm_weight * (loss_full - loss)`` at the end if that weight is > 0. Both subtract
    ``violation_penalty`` for a masked action. ``info["reward_terms"]`` has every term.

    ## Masks
    ``action_masks()`` (sb3-contrib's convention) is the budget mask and the guardrail mask
    together (``drrl_env.guardrail``). The budget (``flops_budget``, a share of full attention's
    logit FLOPs over the episode; ``(lo, hi)``: drawn uniformly per episode) allows a rank only if
    the episode can still end within budget with every later step at the smallest rank: every
    episode ends at or under budget. The guardrail (``guardrail="exact"``: relative logit error
    of rank r against full attention; ``"eq9"``: the paper's transition bound from ``r_{t-1}``;
    ``"off"``) allows what is within ``eps_t = eps0 * exp(-eps_decay * t)`` (Eq. 11). ``t`` is
    the *trainer's* step count, not the env's: set it with ``set_guardrail_step(t)`` (for vector
    envs, ``env_method``/``call``) or ``reset(options={"guardrail_step": t})``; it is 0 until
    set, so the same seed always gives the same episode. The budget wins a conflict: where no
    rank satisfies both, only the largest rank the budget allows stays.

    ## Starting State
    A batch drawn with a per-episode seed from ``self.np_random`` (``info["episode_seed"]``; pass
    ``options={"episode_seed": s}`` to replay one), or the token ids given as
    ``options={"input_ids": ids}`` (``(batch_size, seq_len)``: a policy choosing ranks for given
    prompts, as ``agents.generate`` does); the forward pass runs up to layer 0's attention. With
    ``sensitivity_samples > 0`` the batch's sensitivity profile is computed first (``sensitivity_profile``;
    its FLOPs estimate is ``info["flops_sensitivity"]`` and its wall-clock ``info["seconds_sensitivity"]``, 0
    otherwise).

    ## Episode End
    Terminates after the last layer (and segment): ``L * S`` steps. No truncation. The last
    step's ``info`` has ``kl``, ``lm_loss``, ``lm_loss_full`` (when a reference pass ran: kl
    reward or ``terminal_lm_weight > 0``) and ``budget_used``; ``episode_record()`` returns what
    replays the episode (``drrl_env.replay``).

    ## Arguments
    See :class:`~drrl_env.config.EnvConfig` (every field is a keyword of ``gym.make``), plus
    ``render_mode`` (``"ansi"``: a table of the ranks chosen so far; ``"rgb_array"``: a heatmap).

    ## Registered variants (``drrl_env.config.VARIANTS``; docs/env.md)
    * ``DRRL-Attention-v0``: the recommended MDP, ``EnvConfig``'s defaults: one rank per key/value group
      (``per_head``), ``joint`` spectra, 1 x 128 tokens, budget 0.625, reward -KL (terminal), no guardrail,
      the Eq. S signal in the observation (``sensitivity_estimate="scaled_delta"``, 16 samples for its scale).
      ``python train_agent.py`` trains in it.
    * ``DRRL-Attention-PerLayer-v0``: one rank per layer, no per-input signal in the observation.
    * ``DRRL-Attention-Paper-v0``: the paper's MDP: ``separate`` (Q/K) truncation, the per-step Eq. 13 reward,
      the Eq. 9 transition guardrail (``eps0=0.5``), no budget, 2 x 256 tokens.

    ## Version History
    * v0: initial version; FLOPs budgets, the kl reward, the exact guardrail, an externally set Eq. 11 clock,
      per-head ranks and the Eq. S signal were added within v0; the defaults became the recommended MDP when the
      variants were registered (the paper's MDP is ``DRRL-Attention-Paper-v0``).
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}

    def __init__(self, render_mode: str | None = None, **kwargs: Any) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.config = EnvConfig.from_kwargs(kwargs)
        self.render_mode = render_mode
        self.guardrail_step = 0
        self._attach()
        cfg = self.config
        self.candidate_ranks = torch.tensor(cfg.ranks, dtype=torch.int64)
        num_candidates = len(cfg.ranks)
        self.action_space = (
            spaces.MultiDiscrete([num_candidates] * self.kv_heads) if cfg.per_head else spaces.Discrete(num_candidates)
        )
        self.layout = ObservationLayout(
            num_candidates, self.kv_heads if cfg.per_head else 1, sensitivity=cfg.sensitivity_samples > 0
        )
        self.observation_slices: dict[str, slice] = self.layout.slices
        """Where each part of the observation lies, e.g. ``obs[slices["ner"]]``."""
        self.observation_space = self.layout.space
        self._episode: Episode | None = None
        self._sensitivity: np.ndarray | None = None

    # ----------------------------------------------------------------- set-up and pickling
    def _attach(self) -> None:
        """Load (once per process) the model, hook, tokens and per-model features; check the budget."""
        cfg = self.config
        self.device = resolve_device(cfg.device)
        self.loaded: LoadedModel = load_causal_lm(cfg.model, device=str(self.device))
        self.loaded.check_length(cfg.seq_len, "seq_len")
        self.hook = install(self.loaded.model)
        if cfg.spectral_mode == "calibrated":
            attach_calibration(self.loaded)
        shape = self.loaded.attention_shape
        self.num_layers, self.q_heads, self.kv_heads, self.head_dim = (
            shape.num_layers,
            shape.q_heads,
            shape.kv_heads,
            shape.head_dim,
        )
        if max(cfg.ranks) > self.head_dim:
            raise ValueError(f"ranks must not exceed the model's head_dim ({self.head_dim}), got {list(cfg.ranks)}")
        self._tokens = corpus_tokens(cfg.corpus, cfg.split, self.loaded.tokenizer)
        self._weight_stats = layer_weight_statistics(self.loaded.model)
        self._parameters = sum(parameter.numel() for parameter in self.loaded.model.parameters())
        self._sequence_dynamics = SequenceDynamics(int(self.loaded.model.config.hidden_size))
        spans = segment_spans(cfg.seq_len, cfg.segment_len)  # prefill: segment s sees keys up to its end
        self.num_segments = len(spans)
        self.step_pairs = tuple(attended_pairs(stop - start, stop) for start, stop in spans) * self.num_layers
        if cfg.reference_ranks is not None and len(cfg.reference_ranks) != self.num_layers:
            raise ValueError(
                f"reference_ranks must hold one rank per layer ({self.num_layers}), got {len(cfg.reference_ranks)}"
            )
        if cfg.flops_budget is not None:
            self._budget(cfg.flops_budget[0])  # a budget below the smallest rank's share fails here, at make

    def _budget(self, share: float) -> FlopsBudget:
        groups = self.q_heads // self.kv_heads
        return FlopsBudget(
            self.step_pairs, share, self.config.ranks, self.kv_heads, groups, self.head_dim, self.config.per_head
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("loaded", "hook", "_tokens", "_weight_stats", "_parameters", "_sequence_dynamics", "_episode"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._episode = None
        self._attach()

    # ----------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        """Start an episode.

        ``options``: ``guardrail_step`` (Eq. 11's t), ``episode_seed`` (replay one batch),
        ``input_ids`` (run the episode on these tokens instead of a drawn batch).
        """
        drawn = self._draw(seed, options)
        needed = self.needs_reference
        reference = ReferencePass.run(self.loaded, self.hook, drawn.batch, self.config.segment_len) if needed else None
        return self._begin(drawn, reference)

    @property
    def needs_reference(self) -> bool:
        """Whether an episode needs a full-rank reference pass over its batch (the kl reward, the LM-loss term)."""
        return self.config.reward_kind == "kl" or self.config.terminal_lm_weight > 0

    def _draw(self, seed: int | None, options: dict[str, Any] | None) -> EpisodeStart:
        """The first half of :meth:`reset`: seeding, the episode's batch, budget and sensitivity profile."""
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = sorted(set(options) - {"guardrail_step", "episode_seed", "input_ids"})
        if unknown:
            raise ValueError(f"reset options must be 'guardrail_step', 'episode_seed' or 'input_ids', got {unknown}")
        if "guardrail_step" in options:
            self.set_guardrail_step(options["guardrail_step"])
        self._stop_episode()
        cfg = self.config
        episode_seed = int(options.get("episode_seed", self.np_random.integers(2**63)))
        rng = np.random.default_rng(episode_seed)
        batch = sample_batch(self._tokens, cfg.batch_size, cfg.seq_len, rng).to(self.device)
        if "input_ids" in options:
            batch = self._given_batch(options["input_ids"])
        share = 1.0
        if cfg.flops_budget is not None:
            lo, hi = cfg.flops_budget
            share = lo if lo == hi else float(rng.uniform(lo, hi))
        self._sensitivity = None
        started = time.perf_counter()
        if cfg.sensitivity_samples:
            self._sensitivity = estimated_profile(
                self.loaded,
                batch,
                cfg.ranks,
                cfg.spectral_mode,
                cfg.segment_len,
                cfg.sensitivity_estimate,
                cfg.sensitivity_samples,
                cfg.per_head,
            )
        sensitivity_seconds = time.perf_counter() - started if cfg.sensitivity_samples else 0.0
        return EpisodeStart(batch, share, episode_seed, sensitivity_seconds)

    def _begin(
        self, drawn: EpisodeStart, reference: ReferencePass | None, runner: Any = None
    ) -> tuple[np.ndarray, dict]:
        """The second half of :meth:`reset`: the episode on ``drawn``'s batch, its first observation and info."""
        cfg = self.config
        self._episode = Episode(
            config=cfg,
            loaded=self.loaded,
            hook=self.hook,
            batch=drawn.batch,
            budget=self._budget(drawn.share),
            reference=reference,
            epsilon=self.epsilon,
            episode_seed=drawn.episode_seed,
            guardrail_step=self.guardrail_step,
            num_segments=self.num_segments,
            baseline_ranks=self._baseline_ranks(drawn.share),
            sensitivity=self._sensitivity,
            runner=runner,
        )
        return self._observation(), {
            "layer": self._episode.call.layer,
            "segment": self._episode.call.segment,
            "action_mask": self.action_masks(),
            "epsilon": self.epsilon,
            "budget": drawn.share,
            "episode_seed": drawn.episode_seed,
            "flops_sensitivity": self.profile_flops(cfg.sensitivity_estimate, cfg.sensitivity_samples)
            if cfg.sensitivity_samples
            else 0.0,
            "seconds_sensitivity": drawn.sensitivity_seconds,
        }

    def _baseline_ranks(self, share: float) -> list | None:
        """The fixed allocation a 'reference' / 'waterfill' kl baseline scores (``Episode.baseline_ranks``)."""
        cfg = self.config
        if not cfg.kl_baseline.startswith("waterfill"):
            return None if cfg.reference_ranks is None else list(cfg.reference_ranks)
        return waterfill_plan(self._sensitivity, cfg.ranks, self.head_dim, share)

    def profile_flops(self, estimate: str, samples: int) -> float:
        """FLOPs estimate of a label-free sensitivity profile of one of this env's batches (``batch_size x seq_len``).

        ``estimate`` 'fisher' (``samples`` backward passes; ``drrl_env.attention.flops.sensitivity_profile_flops``) or
        'scaled_delta' (one forward with every candidate's attention; ``scaled_delta_profile_flops``).
        """
        cfg = self.config
        tokens = cfg.batch_size * cfg.seq_len
        if estimate == "fisher":
            return sensitivity_profile_flops(self._parameters, tokens, samples)
        if estimate != "scaled_delta":
            raise ValueError(f"estimate must be 'fisher' or 'scaled_delta', got {estimate!r}")
        shape = (self.num_layers, cfg.batch_size, self.q_heads, self.kv_heads, cfg.seq_len, self.head_dim)
        candidates = candidate_attention_flops(*shape, cfg.ranks, cfg.spectral_mode)
        return scaled_delta_profile_flops(self._parameters, tokens, candidates)

    def _given_batch(self, input_ids: Any) -> torch.Tensor:
        """``reset(options={"input_ids": ...})``: the tokens as a ``(batch_size, seq_len)`` int64 device tensor."""
        batch = torch.as_tensor(input_ids, dtype=torch.int64)
        expected = (self.config.batch_size, self.config.seq_len)
        if tuple(batch.shape) != expected:
            raise ValueError(
                f"reset option input_ids must have shape {expected} (batch_size, seq_len), got {tuple(batch.shape)}"
            )
        return batch.to(self.device)

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        episode = self._require_episode("step()")
        return self._stepped(episode.step(self._requested(action)))

    def _requested(self, action: Any) -> torch.Tensor:
        """``action`` as candidate indices ``(Hkv,)``, or a one-line ``ValueError``."""
        return action_indices(action, len(self.config.ranks), self.kv_heads, self.config.per_head)

    def _stepped(self, outcome: StepOutcome) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """What :meth:`step` returns for a step's ``outcome``."""
        info = outcome.info
        info["action_mask"] = self.action_masks() if not outcome.terminated else np.zeros_like(info["mask_before"])
        if outcome.terminated:
            observation = np.zeros(self.observation_space.shape, dtype=np.float32)
        else:
            observation = self._observation()
        return observation, outcome.reward, outcome.terminated, False, info

    def set_guardrail_step(self, step: int) -> None:
        """Set Eq. 11's ``t`` (the trainer's step count); takes effect at the next step's mask."""
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
            raise ValueError(f"guardrail_step must be an integer >= 0, got {step!r}")
        self.guardrail_step = int(step)
        if self._episode is not None:
            self._episode.set_epsilon(self.epsilon, self.guardrail_step)

    @property
    def epsilon(self) -> float:
        """The guardrail threshold ``eps_t`` at the current ``guardrail_step`` (Eq. 11)."""
        return guardrail_threshold(self.config.eps0, self.config.eps_decay, self.guardrail_step)

    def candidate_rewards(self) -> CandidateRewards:
        """Eq. 13 reward of every candidate rank at the current step, without taking the step.

        All ``K`` candidates are evaluated in one batched low-rank attention pass that shares the
        step's spectra; nothing in the episode changes. Candidate ``k`` means the action ``k``
        (every key/value group at rank ``ranks[k]`` with ``per_head``). ``reward[k]`` equals the
        reward ``step(k)`` returns when ``k`` is allowed; the terminal LM-loss term is not
        included. Only for ``reward="eq13"``: the kl reward of a step depends on later layers.
        """
        episode = self._require_episode("candidate_rewards()")
        if self.config.reward_kind != "eq13":
            raise ValueError(
                "candidate_rewards() scores the per-step Eq. 13 reward; this env has reward='kl', whose step "
                "reward depends on later layers (make the env with reward='eq13' for the greedy oracle)"
            )
        return episode.candidates()

    def candidate_logit_errors(self, per_group: bool = False) -> np.ndarray:
        """Relative logit error against full attention of every candidate rank at the current step.

        ``(K,)`` over all key/value groups, or ``(K, Hkv)`` with ``per_group``: what the ``exact``
        guardrail compares with ``eps_t`` (``drrl_env.guardrail.truncation_errors``).
        """
        episode = self._require_episode("candidate_logit_errors()")
        errors = episode.truncation or truncation_errors(episode.call, self.candidate_ranks, self.config.spectral_mode)
        return errors.relative(per_group=per_group).cpu().numpy()

    def episode_record(self) -> dict[str, Any]:
        """What reproduces the current (or last) episode, JSON-ready: see ``drrl_env.replay``."""
        if self._episode is None:
            raise RuntimeError("DRRL-Attention-v0: call reset() before episode_record()")
        return self._episode.record()

    @property
    def input_ids(self) -> torch.Tensor:
        """The current episode's token batch ``(B, n)`` (what a hindsight oracle profiles; no labels beyond it)."""
        return self._require_episode("input_ids").batch

    @property
    def sensitivity_profile(self) -> np.ndarray | None:
        """``(L, K)`` what each layer's rank costs on this episode's batch (``sensitivity_estimate``), or None.

        ``(L, Hkv, K)`` with ``per_head`` (each key/value group alone at each rank). The per-token KL the
        observation's ``sensitivity`` part shows; None with ``sensitivity_samples=0``
        (``drrl_env.profiles.sensitivity``).
        """
        self._require_episode("sensitivity_profile")
        return self._sensitivity

    @property
    def budget_share(self) -> float | None:
        """The current episode's FLOPs budget (a share of full attention's logit FLOPs), or None without one."""
        return self._require_episode("budget_share").budget.share if self.config.flops_budget is not None else None

    @property
    def attention_call(self) -> AttentionCall:
        """The current step's attention call: post-RoPE Q, K, V of the layer/segment and their cached spectra."""
        return self._require_episode("attention_call").call

    def action_masks(self) -> np.ndarray:
        """Boolean mask of allowed actions: ``(K,)``, or ``(Hkv * K,)`` group-major with ``per_head``."""
        return self._require_episode("action_masks()").flat_mask()

    def render(self) -> str | np.ndarray | None:
        history = self._episode.history if self._episode else [[None] * self.num_segments] * self.num_layers
        if self.render_mode == "ansi":
            return rank_table_ansi(history)
        if self.render_mode == "rgb_array":
            return rank_heatmap_rgb(rank_grid(history), min(self.config.ranks), max(self.config.ranks))
        return None

    def close(self) -> None:
        self._stop_episode()
        super().close()

    # ----------------------------------------------------------------- internals
    def _require_episode(self, what: str) -> Episode:
        if self._episode is None or self._episode.call is None:
            raise RuntimeError(
                f"DRRL-Attention-v0: call reset() before {what} (the episode has not started or has ended)"
            )
        return self._episode

    def _stop_episode(self) -> None:
        if getattr(self, "_episode", None) is not None:
            self._episode.abort()

    def _observation(self) -> np.ndarray:
        cfg, episode = self.config, self._episode
        call = episode.call
        ner = candidate_ner(call, self.candidate_ranks, cfg.spectral_mode, self.kv_heads)  # (K, Hkv)
        prev = episode.previous_ranks.double() / self.head_dim
        budget_left = episode.budget.left_share(episode.step_index)
        parts = {}
        if self._sensitivity is not None:
            shares = rank_shares(cfg.ranks, self.head_dim)
            parts["sensitivity"] = sensitivity_features(self._sensitivity, call.layer, shares, budget_left)
        return self.layout.build(
            sequence_dynamics=self._sequence_dynamics(call.hidden_states),
            weight_statistics=self._weight_stats[call.layer],
            previous_rank=prev.numpy() if cfg.per_head else [float(prev.mean())],
            ner=ner.T.reshape(-1).numpy() if cfg.per_head else ner.mean(-1).numpy(),
            budget=[episode.budget.share, budget_left],
            context=[
                call.layer / max(self.num_layers - 1, 1),
                call.segment / max(call.num_segments - 1, 1),
                self.epsilon / cfg.eps0,
            ],
            **parts,
        )
