"""DRRL-Attention-v0: choose the rank of each layer's low-rank attention in a real LM."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from drrl_env.bounds import normalized_energy_ratio
from drrl_env.corpora import DEFAULT_CORPUS, corpus_tokens, sample_batch
from drrl_env.features import FEATURE_CLIP, SequenceDynamics, layer_weight_statistics
from drrl_env.flops import AttentionFlops, full_attention_flops, low_rank_attention_flops
from drrl_env.guardrail import TransitionEnergies, guardrail_mask, guardrail_threshold, transition_energies
from drrl_env.hook import AttentionCall, install
from drrl_env.lowrank import SPECTRAL_MODES
from drrl_env.models import DEFAULT_MODEL, LoadedModel, load_causal_lm, resolve_device
from drrl_env.reward import attention_output_similarity, rank_reward
from drrl_env.runner import SteppedForward

DEFAULT_RANKS = (16, 24, 32, 40, 48, 56, 64)


def rank_heatmap_rgb(grid: np.ndarray, low: float, high: float, cell: tuple[int, int] = (16, 32)) -> np.ndarray:
    """A ``(L, S)`` grid of ranks as an RGB ``uint8`` image: dark blue at ``low``, yellow at ``high``, grey for NaN."""
    level = np.nan_to_num((grid - low) / max(high - low, 1), nan=-1.0)
    image = np.zeros((*grid.shape, 3), dtype=np.uint8)
    known = level >= 0
    image[..., 0] = np.where(known, 255 * level, 40).astype(np.uint8)
    image[..., 1] = np.where(known, 200 * level, 40).astype(np.uint8)
    image[..., 2] = np.where(known, 255 * (1 - level), 40).astype(np.uint8)
    return np.kron(image, np.ones((*cell, 1), dtype=np.uint8))


@dataclass(frozen=True)
class CandidateRewards:
    """Eq. 13 reward and its terms for every candidate rank of one step, each ``(K,)``.

    Attributes:
        ranks: the candidate ranks (the action ``k`` is ``ranks[k]``).
        allowed: the guardrail mask (for every key/value group).
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
class _Outcome:
    """What ``K`` rank choices of one step give: outputs ``(K, B, Hq, m, d)`` and per-choice terms ``(K,)``."""

    output: torch.Tensor
    fidelity: torch.Tensor
    flops: list[AttentionFlops]
    flops_full: AttentionFlops
    flops_ratio: torch.Tensor
    perturbation: torch.Tensor


@dataclass
class EnvConfig:
    """Arguments of DRRL-Attention-v0 (every field is a ``gym.make`` keyword)."""

    model: str = DEFAULT_MODEL
    """causal LM: the offline default, a local folder, or a hub id"""
    corpus: str = DEFAULT_CORPUS
    """corpus the episodes' text is drawn from"""
    split: str = "train"
    """corpus split: train, validation or test"""
    batch_size: int = 2
    """sequences per episode (B)"""
    seq_len: int = 256
    """tokens per sequence (n)"""
    segment_len: int | None = None
    """queries per segment (T); None: one segment per layer"""
    ranks: tuple[int, ...] = DEFAULT_RANKS
    """candidate ranks; the action is an index into this sorted list"""
    per_head: bool = False
    """one rank per key/value head group (MultiDiscrete) instead of one per layer"""
    spectral_mode: str = "separate"
    """'separate' (the paper's Q/K truncation) or 'joint' (optimal logit truncation)"""
    alpha: float = 1.0
    """weight of the fidelity term of Eq. 13"""
    beta: float = 0.5
    """weight of the FLOPs term of Eq. 13"""
    gamma: float = 0.1
    """weight of the perturbation term of Eq. 13"""
    eps0: float = 0.5
    """initial guardrail threshold on the relative logit perturbation (Eq. 11)"""
    eps_decay: float = 1e-5
    """guardrail annealing rate lambda per env step (Eq. 11)"""
    guardrail: bool = True
    """mask transitions whose perturbation exceeds eps_t; False for the ablation"""
    violation_penalty: float = 0.1
    """reward penalty when a masked action arrives (it is executed as the nearest allowed rank)"""
    terminal_lm_weight: float = 0.0
    """weight of the terminal reward: LM loss at full rank minus LM loss with the chosen ranks"""
    device: str = "auto"
    """'auto' (CUDA when present), 'cpu' or 'cuda'"""

    def __post_init__(self) -> None:
        def positive_int(name: str, value: Any, minimum: int = 1) -> None:
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")

        positive_int("batch_size", self.batch_size)
        positive_int("seq_len", self.seq_len, 2)
        if self.segment_len is not None:
            positive_int("segment_len", self.segment_len)
            if self.segment_len > self.seq_len:
                raise ValueError(f"segment_len ({self.segment_len}) must not exceed seq_len ({self.seq_len})")
        ranks = tuple(int(r) for r in np.asarray(self.ranks).ravel())
        if not ranks or any(r < 1 for r in ranks) or len(set(ranks)) != len(ranks):
            raise ValueError(f"ranks must be distinct positive integers, got {self.ranks!r}")
        self.ranks = tuple(sorted(ranks))
        if self.spectral_mode not in SPECTRAL_MODES:
            raise ValueError(f"spectral_mode must be one of {SPECTRAL_MODES}, got {self.spectral_mode!r}")
        for name in ("alpha", "beta", "gamma", "violation_penalty", "terminal_lm_weight", "eps_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.eps0, (int, float)) or not self.eps0 > 0 or not math.isfinite(self.eps0):
            raise ValueError(f"eps0 must be a finite number > 0, got {self.eps0!r}")
        if self.split not in ("train", "validation", "test"):
            raise ValueError(f"split must be one of ('train', 'validation', 'test'), got {self.split!r}")

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> EnvConfig:
        """Build from ``gym.make`` keywords; unknown keywords get an error listing the valid ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(f"DRRL-Attention-v0 got unknown argument(s) {unknown}; valid arguments: {names}")
        return cls(**kwargs)


class DRRLAttentionEnv(gym.Env[np.ndarray, Any]):
    """Rank selection for low-rank attention in a real causal LM, one layer (and segment) per step.

    ## Description
    An episode is one forward pass of the LM over a batch of ``batch_size`` sequences of
    ``seq_len`` tokens drawn (seeded by ``reset``) from a corpus split. Steps walk the layers in
    order and, when ``segment_len`` T < n, the query segments of each layer (paper IV.E: the rank of
    a segment applies to its queries against all keys so far). At each step the agent picks the
    rank of the current layer/segment; the low-rank attention output then *replaces* the full one
    in the forward pass, so later layers see its effect. The forward pass is paused between
    steps (see ``drrl_env.runner``), so a step costs about one layer.

    ## Action Space
    ``Discrete(K)``: an index into the sorted candidate ranks ``ranks`` (default 16..64 by 8).
    With ``per_head=True``: ``MultiDiscrete([K] * Hkv)``, one rank per key/value head group (GQA
    models share K across the query heads of a group). An out-of-range index, a wrong shape or
    a NaN raises ``ValueError``. A rank the guardrail masks is executed as the nearest allowed rank
    (ties: the larger), ``info["masked_violation"]`` is True and ``violation_penalty`` is subtracted.

    ## Observation Space
    ``Box(-10, 10, (D,), float32)``, the concatenation (Eq. 6 plus Eq. 14 and context):

    * ``h_t`` (16): sequence dynamics, a fixed seeded 1-D convolution over the layer's input
      hidden states (``drrl_env.features.SequenceDynamics``);
    * ``w_t`` (9): mean, variance and power-iteration spectral norm (Eq. 16) of W_Q, W_K, W_V of
      the layer, standardised across layers;
    * ``r_{t-1}/d`` (1, or Hkv with ``per_head``): the previous rank (``d`` at the first step);
    * NER (Eq. 14) of every candidate rank (K, or K*Hkv group-major): in ``separate`` mode the mean
      of the Q and K NERs, in ``joint`` mode the NER of the logits; averaged over the step's blocks;
    * the layer's depth fraction ``l/(L-1)``, the segment position ``s/(S-1)`` (0 with one segment),
      and ``eps_t/eps0``.

    ## Rewards
    Eq. 13: ``alpha * sim - beta * FLOPs(r_t) - gamma * ||dA||`` (minus ``violation_penalty`` for a
    masked action). ``sim`` is the mean cosine similarity of the full and low-rank attention outputs
    (``drrl_env.reward``); ``FLOPs(r_t)`` is the step's low-rank attention FLOPs, overheads
    included, over full attention's (``drrl_env.flops``); ``||dA||`` is the relative logit
    perturbation of the transition ``r_{t-1} -> r_t`` (``drrl_env.guardrail``: the Eq. 9 bound in
    ``separate`` mode, exact in ``joint`` mode). With ``terminal_lm_weight > 0`` the last step also
    gets ``terminal_lm_weight * (loss_full - loss_low_rank)``, the change of the batch's LM loss
    (nats/token), the end-to-end signal the paper lists as future work (one extra full forward
    per episode).

    ``action_masks()`` (sb3-contrib's convention) is True where the transition's perturbation is
    within ``eps_t = eps0 * exp(-eps_decay * t)`` (Eq. 11), ``t`` counting env steps over all
    episodes (kept by pickling). The largest rank is always allowed. ``guardrail=False`` allows all.

    ## Starting State
    A batch drawn with ``self.np_random``; the forward pass runs up to layer 0's attention.

    ## Episode End
    Terminates after the last layer (and segment): ``L * S`` steps. No truncation.

    ## Arguments
    See :class:`EnvConfig` (every field is a keyword of ``gym.make``), plus ``render_mode``
    (``"ansi"``: a table of the ranks chosen so far; ``"rgb_array"``: the same as a heatmap).

    ## Version History
    * v0: initial version.
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}

    def __init__(self, render_mode: str | None = None, **kwargs: Any) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.config = EnvConfig.from_kwargs(kwargs)
        self.render_mode = render_mode
        self.total_steps = 0
        self._attach()
        cfg = self.config
        self.candidate_ranks = torch.tensor(cfg.ranks, dtype=torch.int64)
        num_candidates, heads = len(cfg.ranks), self.kv_heads if cfg.per_head else 1
        self.action_space = (
            spaces.MultiDiscrete([num_candidates] * self.kv_heads) if cfg.per_head else spaces.Discrete(num_candidates)
        )
        widths = {
            "sequence_dynamics": self._sequence_dynamics.size,
            "weight_statistics": 9,
            "previous_rank": heads,
            "ner": num_candidates * heads,
            "context": 3,
        }
        bounds = np.cumsum([0, *widths.values()])
        self.observation_slices: dict[str, slice] = {
            name: slice(int(start), int(stop))
            for name, start, stop in zip(widths, bounds[:-1], bounds[1:], strict=True)
        }
        """Where each part of the observation lies (see Observation Space), e.g. ``obs[slices["ner"]]``."""
        size = int(bounds[-1])
        self.observation_space = spaces.Box(-FEATURE_CLIP, FEATURE_CLIP, (size,), np.float32)
        self._call: AttentionCall | None = None
        self._runner: SteppedForward | None = None
        self._history: list[list[Any]] = []

    # ----------------------------------------------------------------- set-up and pickling
    def _attach(self) -> None:
        """Load (once per process) the model, hook, tokens and per-model features."""
        cfg = self.config
        self.device = resolve_device(cfg.device)
        self.loaded: LoadedModel = load_causal_lm(cfg.model, device=str(self.device))
        model_config = self.loaded.model.config
        self.hook = install(self.loaded.model)
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
        self._sequence_dynamics = SequenceDynamics(int(model_config.hidden_size))
        segment = cfg.segment_len or cfg.seq_len
        self.num_segments = math.ceil(cfg.seq_len / segment)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("loaded", "hook", "_tokens", "_weight_stats", "_sequence_dynamics", "_call", "_runner"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._call, self._runner = None, None
        self._attach()

    # ----------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._stop_runner()
        cfg = self.config
        batch = sample_batch(self._tokens, cfg.batch_size, cfg.seq_len, self.np_random).to(self.device)
        self._full_loss = None
        if cfg.terminal_lm_weight > 0:
            with torch.no_grad():
                self._full_loss = float(self.loaded.model(input_ids=batch, labels=batch).loss)
        self._runner = SteppedForward(
            self.loaded.model, self.hook, batch, cfg.segment_len, compute_loss=cfg.terminal_lm_weight > 0
        )
        self._prev_ranks = torch.full((self.kv_heads,), self.head_dim, dtype=torch.int64)
        self._history = [[None] * self.num_segments for _ in range(self.num_layers)]
        self._call = self._runner.start()
        self._prepare_step()
        return self._observation(), {
            "layer": self._call.layer,
            "segment": self._call.segment,
            "action_mask": self.action_masks(),
            "epsilon": self._epsilon,
        }

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._call is None or self._runner is None:
            raise RuntimeError(
                "DRRL-Attention-v0: call reset() before step() (the episode has not started or has ended)"
            )
        cfg, call = self.config, self._call
        requested = self._action_indices(action)  # (Hkv,)
        chosen, violation = self._nearest_allowed(requested)
        ranks = self.candidate_ranks[chosen]  # (Hkv,)
        outcome = self._evaluate(chosen.unsqueeze(0))
        low = outcome.output[0]
        fidelity, flops_ratio, perturbation = (
            float(outcome.fidelity[0]),
            float(outcome.flops_ratio[0]),
            float(outcome.perturbation[0]),
        )
        terms = {
            "fidelity": cfg.alpha * fidelity,
            "flops": -cfg.beta * flops_ratio,
            "perturbation": -cfg.gamma * perturbation,
            "violation": -cfg.violation_penalty if violation else 0.0,
            "terminal": 0.0,
        }
        rank_value: int | list[int] = int(ranks[0]) if not cfg.per_head else [int(r) for r in ranks]
        info: dict[str, Any] = {
            "rank": rank_value,
            "requested_rank": int(self.candidate_ranks[requested[0]])
            if not cfg.per_head
            else [int(self.candidate_ranks[i]) for i in requested],
            "layer": call.layer,
            "segment": call.segment,
            "flops": outcome.flops[0].total,
            "flops_core": outcome.flops[0].core,
            "flops_full": outcome.flops_full.total,
            "fidelity": fidelity,
            "perturbation": perturbation,
            "epsilon": self._epsilon,
            "action_mask": self.action_masks(),
            "masked_violation": violation,
        }
        self._history[call.layer][call.segment] = rank_value
        self._prev_ranks = ranks.clone()
        self.total_steps += 1
        self._call = self._runner.send(low)
        terminated = self._call is None
        if terminated:
            if cfg.terminal_lm_weight > 0:
                terms["terminal"] = cfg.terminal_lm_weight * (self._full_loss - self._runner.loss)
                info["lm_loss"], info["lm_loss_full"] = self._runner.loss, self._full_loss
            self._runner = None
            observation = np.zeros(self.observation_space.shape, dtype=np.float32)
        else:
            self._prepare_step()
            observation = self._observation()
        info["reward_terms"] = terms
        reward = rank_reward(fidelity, flops_ratio, perturbation, cfg.alpha, cfg.beta, cfg.gamma)
        return observation, reward + terms["violation"] + terms["terminal"], terminated, False, info

    def candidate_rewards(self) -> CandidateRewards:
        """Eq. 13 reward of every candidate rank at the current step, without taking the step.

        All ``K`` candidates are evaluated in one batched low-rank attention pass that shares the
        step's spectra (``low_rank_attention`` with a ``(K, Hkv)`` rank table); nothing in the
        episode changes. Candidate ``k`` means the action ``k`` (every key/value group at rank
        ``ranks[k]`` with ``per_head``). ``reward[k]`` equals the reward ``step(k)`` returns
        when ``k`` is allowed (a masked ``k`` would be executed as another rank and penalised);
        the terminal LM-loss term, known only at the episode's end, is not included.
        """
        if self._call is None:
            raise RuntimeError("DRRL-Attention-v0: call reset() before candidate_rewards()")
        cfg = self.config
        num_candidates = len(cfg.ranks)
        table = torch.arange(num_candidates).unsqueeze(1).expand(-1, self.kv_heads)  # (K, Hkv) candidate indices
        outcome = self._evaluate(table)
        reward = np.array(
            [
                rank_reward(float(f), float(c), float(p), cfg.alpha, cfg.beta, cfg.gamma)
                for f, c, p in zip(outcome.fidelity, outcome.flops_ratio, outcome.perturbation, strict=True)
            ]
        )
        mask = self._mask.all(dim=1).numpy()  # (K,): allowed for every group
        return CandidateRewards(
            ranks=np.asarray(cfg.ranks),
            allowed=mask,
            reward=reward,
            fidelity=outcome.fidelity.numpy(),
            flops_ratio=outcome.flops_ratio.numpy(),
            perturbation=outcome.perturbation.numpy(),
        )

    @property
    def attention_call(self) -> AttentionCall:
        """The current step's attention call: post-RoPE Q, K, V of the layer/segment and their cached spectra.

        For policies that read the spectra directly (the stable-rank and threshold baselines).
        """
        if self._call is None:
            raise RuntimeError("DRRL-Attention-v0: call reset() before attention_call")
        return self._call

    def action_masks(self) -> np.ndarray:
        """Boolean mask of allowed actions: ``(K,)``, or ``(Hkv * K,)`` group-major with ``per_head``."""
        if self._call is None:
            raise RuntimeError("DRRL-Attention-v0: call reset() before action_masks()")
        mask = self._mask.numpy()
        return mask.T.reshape(-1).copy() if self.config.per_head else mask[:, 0].copy()

    def render(self) -> str | np.ndarray | None:
        if self.render_mode == "ansi":
            header = "layer | " + " ".join(f"seg{s:<3}" for s in range(self.num_segments))
            rows = [header]
            for layer, ranks in enumerate(self._history):
                cells = ["  -   " if r is None else f"{'/'.join(map(str, np.atleast_1d(r))):<6}" for r in ranks]
                rows.append(f"{layer:>5} | " + " ".join(cells))
            return "\n".join(rows)
        if self.render_mode == "rgb_array":
            grid = np.array(
                [[np.nan if r is None else float(np.mean(r)) for r in ranks] for ranks in self._history]
            )  # (L, S)
            return rank_heatmap_rgb(grid, min(self.config.ranks), max(self.config.ranks))
        return None

    def close(self) -> None:
        self._stop_runner()
        super().close()

    # ----------------------------------------------------------------- internals
    def _stop_runner(self) -> None:
        if getattr(self, "_runner", None) is not None:
            self._runner.abort()
        self._runner, self._call = None, None

    @property
    def _epsilon(self) -> float:
        return guardrail_threshold(self.config.eps0, self.config.eps_decay, self.total_steps)

    def _prepare_step(self) -> None:
        """Per-step quantities shared by the observation, the mask and the reward."""
        self._energies: TransitionEnergies = transition_energies(
            self._call, self._prev_ranks, self.candidate_ranks, self.config.spectral_mode
        )
        if not self.config.guardrail:
            self._mask = torch.ones(len(self.config.ranks), self.kv_heads, dtype=torch.bool)
            return
        relative = self._energies.relative(per_group=self.config.per_head).cpu()
        relative = relative if self.config.per_head else relative.unsqueeze(-1).expand(-1, self.kv_heads)
        self._mask = guardrail_mask(relative, self._epsilon)

    def _evaluate(self, choices: torch.Tensor) -> _Outcome:
        """Low-rank outputs and reward terms of ``choices (K, Hkv)`` (candidate indices), batched over ``K``."""
        cfg, call = self.config, self._call
        ranks = self.candidate_ranks[choices]  # (K, Hkv)
        low = call.low_rank(ranks, cfg.spectral_mode)  # (K, B, Hq, m, d)
        fidelity = attention_output_similarity(call.full(), low)  # (K,)
        batch, _, m, _ = call.query.shape
        n = call.key.shape[-2]
        flops = [
            low_rank_attention_flops(batch, self.q_heads, self.kv_heads, m, n, self.head_dim, row, cfg.spectral_mode)
            for row in ranks
        ]
        flops_full = full_attention_flops(batch, self.q_heads, m, n, self.head_dim)
        flops_ratio = torch.tensor([f.total / flops_full.total for f in flops], dtype=torch.float64)
        perturbation = torch.tensor([self._energies.relative_of(row) for row in choices], dtype=torch.float64)
        return _Outcome(low, fidelity, flops, flops_full, flops_ratio, perturbation)

    def _observation(self) -> np.ndarray:
        cfg, call = self.config, self._call
        candidates = self.candidate_ranks.view(-1, 1, 1).to(self.device)  # (K, 1, 1) against (B, H, d)

        def per_group(ner: torch.Tensor) -> torch.Tensor:  # (K, B, H) -> (K, Hkv), H = Hq or Hkv
            return ner.reshape(len(cfg.ranks), -1, self.kv_heads, ner.shape[-1] // self.kv_heads).mean(dim=(1, 3))

        if cfg.spectral_mode == "joint":
            _, core_s, _ = call.logit_core
            ner = per_group(normalized_energy_ratio(core_s, candidates))  # NER of the logits
        else:
            ner_q = normalized_energy_ratio(call.query_spectrum.singular_values, candidates)
            ner_k = normalized_energy_ratio(call.key_spectrum.singular_values, candidates)
            ner = 0.5 * (per_group(ner_q) + per_group(ner_k))
        ner_feature = ner.T.reshape(-1) if cfg.per_head else ner.mean(-1)
        prev = self._prev_ranks.double() / self.head_dim
        prev_feature = prev if cfg.per_head else prev.mean().view(1)
        context = [
            call.layer / max(self.num_layers - 1, 1),
            call.segment / max(call.num_segments - 1, 1),
            self._epsilon / cfg.eps0,
        ]
        parts = [
            self._sequence_dynamics(call.hidden_states),
            self._weight_stats[call.layer],
            prev_feature.cpu().numpy(),
            ner_feature.cpu().numpy(),
            np.asarray(context),
        ]
        return np.clip(np.concatenate(parts).astype(np.float32), -FEATURE_CLIP, FEATURE_CLIP)

    def _action_indices(self, action: Any) -> torch.Tensor:
        """Validate an action; return candidate indices per key/value group, ``(Hkv,)``."""
        array = np.asarray(action)
        expected = f"shape ({self.kv_heads},)" if self.config.per_head else "a scalar (or shape (1,))"
        if array.dtype.kind not in "iuf" and array.dtype != object:
            raise ValueError(f"action must be integer index(es) into ranks, {expected}; got {action!r}")
        if array.dtype.kind == "f" or array.dtype == object:
            as_float = array.astype(np.float64)
            if not np.all(np.isfinite(as_float)) or not np.all(as_float == np.round(as_float)):
                raise ValueError(f"action must be integer index(es) into ranks, got {action!r} (NaN or fractional)")
            array = as_float.astype(np.int64)
        if self.config.per_head:
            if array.shape != (self.kv_heads,):
                raise ValueError(f"action must have {expected} (one index per key/value head), got shape {array.shape}")
        elif array.size != 1:
            raise ValueError(f"action must be {expected}, got shape {array.shape}")
        indices = array.reshape(-1).astype(np.int64)
        if indices.min() < 0 or indices.max() >= len(self.config.ranks):
            raise ValueError(f"action index(es) must lie in [0, {len(self.config.ranks) - 1}], got {indices.tolist()}")
        if not self.config.per_head:
            indices = np.repeat(indices, self.kv_heads)
        return torch.as_tensor(indices)

    def _nearest_allowed(self, requested: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Replace masked choices by the nearest allowed rank (ties: the larger); report a violation."""
        chosen, violation = requested.clone(), False
        ranks = self.candidate_ranks.double()
        for group in range(self.kv_heads):
            column = self._mask[:, group]
            if bool(column[requested[group]]):
                continue
            violation = True
            distance = (ranks - ranks[requested[group]]).abs() - 1e-3 * ranks  # ties toward larger
            distance[~column] = float("inf")
            chosen[group] = int(distance.argmin())
        return chosen, violation  # without per_head all columns of the mask are equal: one rank
