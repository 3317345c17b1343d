"""State of the rank-selection MDP (Eq. 6): the observation vector, its parts and their widths.

:class:`ObservationLayout` owns the observation: which parts it has, how wide each is, where
each lies (``slices``), its space, and how the parts are joined. The parts are computed here:
sequence dynamics (:class:`SequenceDynamics`), weight statistics (:func:`layer_weight_statistics`)
and the NER of every candidate rank (:func:`candidate_ner`, Eq. 14).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from gymnasium import spaces
from transformers import PreTrainedModel

from drrl_env.attention.bounds import normalized_energy_ratio
from drrl_env.attention.hook import AttentionCall, UnsupportedModelError
from drrl_env.attention.spectra import power_iteration_spectral_norm
from drrl_env.guardrail import truncation_errors
from drrl_env.profiles.sensitivity import sensitivity_width

CONV_CHANNELS = 8
CONV_KERNEL = 3
CONV_SEED = 0
FEATURE_CLIP = 10.0


class SequenceDynamics:
    """``h_t``: a fixed 1-D convolution over the layer's input hidden states (Eq. 6).

    The paper names "a lightweight 1D-convolutional layer over the input embeddings" and does
    not say whether it is learned. Here it is a *fixed* random-feature extractor: ``CONV_CHANNELS``
    filters of width ``CONV_KERNEL`` with weights drawn once from a Gaussian seeded by
    ``CONV_SEED`` (scaled by ``1/sqrt(hidden * kernel)``), applied to each token vector divided by
    its RMS (the residual stream's scale grows with depth). The feature is the mean and standard
    deviation of each channel over batch and time, ``2 * CONV_CHANNELS`` numbers. Fixed weights
    keep observations reproducible across runs and algorithms; whatever must be learned on top
    of them is the policy's job.
    """

    def __init__(self, hidden_size: int) -> None:
        generator = torch.Generator().manual_seed(CONV_SEED)
        weight = torch.randn(CONV_CHANNELS, hidden_size, CONV_KERNEL, generator=generator)
        self.weight = weight / (hidden_size * CONV_KERNEL) ** 0.5  # (C, hidden, kernel)

    @property
    def size(self) -> int:
        return 2 * CONV_CHANNELS

    def __call__(self, hidden_states: torch.Tensor | None) -> np.ndarray:
        """``(B, m, hidden) -> (2C,)`` float32; zeros when the hidden states are not available."""
        if hidden_states is None:
            return np.zeros(self.size, dtype=np.float32)
        x = hidden_states.float()
        x = x / x.square().mean(-1, keepdim=True).add(1e-6).sqrt()  # (B, m, hidden), unit RMS tokens
        weight = self.weight.to(x.device)
        y = torch.nn.functional.conv1d(x.transpose(1, 2), weight, padding=CONV_KERNEL // 2)  # (B, C, m)
        features = torch.cat([y.mean(dim=(0, 2)), y.std(dim=(0, 2), unbiased=False)])
        return features.clamp(-FEATURE_CLIP, FEATURE_CLIP).cpu().numpy().astype(np.float32)


def attention_weight_matrices(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W_Q, W_K, W_V`` of an attention module as ``(out, in)`` matrices (Llama-style or GPT-2)."""
    if all(hasattr(module, name) for name in ("q_proj", "k_proj", "v_proj")):
        return module.q_proj.weight, module.k_proj.weight, module.v_proj.weight
    if hasattr(module, "c_attn"):  # GPT-2 Conv1D: weight (in, 3 * out)
        q, k, v = module.c_attn.weight.t().chunk(3, dim=0)
        return q, k, v
    raise UnsupportedModelError(
        f"cannot find W_Q, W_K, W_V in {type(module).__name__} (expected q_proj/k_proj/v_proj or c_attn)"
    )


@functools.lru_cache(maxsize=8)
def layer_weight_statistics(model: PreTrainedModel) -> np.ndarray:
    """``w_t`` for every layer, ``(L, 9)`` float32: mean, variance and spectral norm of W_Q, W_K, W_V.

    Spectral norms by power iteration (Eq. 16, ``K = 3`` as in the paper, seeded). Each of the 9
    statistics is standardised across layers (z-score) so that observations are scale-free, and
    clipped to ``[-FEATURE_CLIP, FEATURE_CLIP]``. Computed once per model.
    """
    hook = getattr(model, "_drrl_hook", None)
    if hook is None:
        raise RuntimeError("install the drrl hook on the model before computing layer statistics")
    modules = hook.modules
    rows = []
    for module in modules:
        row = []
        for weight in attention_weight_matrices(module):
            w = weight.detach().double().cpu()
            norm = power_iteration_spectral_norm(w, 3, torch.Generator().manual_seed(CONV_SEED))
            row += [float(w.mean()), float(w.var()), float(norm)]
        rows.append(row)
    stats = np.asarray(rows, dtype=np.float64)
    spread = stats.std(axis=0)
    z = (stats - stats.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    return np.clip(z, -FEATURE_CLIP, FEATURE_CLIP).astype(np.float32)


def candidate_ner(call: AttentionCall, ranks: torch.Tensor, mode: str, kv_heads: int) -> torch.Tensor:
    """NER (Eq. 14) of every candidate rank per key/value group, ``(K, Hkv)``, averaged over the step's blocks.

    ``separate`` mode: the mean of the Q and K NERs; ``joint`` mode: the NER of the logits;
    ``calibrated`` mode (no per-input truncation): the share of this input's logit energy the
    calibrated basis keeps, ``1 - ||S - S_r||_F^2 / ||S||_F^2`` (1 at rank ``d``).
    """
    candidates = ranks.view(-1, 1, 1).to(call.query.device)  # (K, 1, 1) against (B, H, d)

    def per_group(ner: torch.Tensor) -> torch.Tensor:  # (K, B, H) -> (K, Hkv), H = Hq or Hkv
        return ner.reshape(len(ranks), -1, kv_heads, ner.shape[-1] // kv_heads).mean(dim=(1, 3))

    if mode == "joint":
        _, core_s, _ = call.logit_core
        return per_group(normalized_energy_ratio(core_s, candidates)).cpu()
    if mode == "calibrated":
        relative = truncation_errors(call, ranks, mode).relative(per_group=True)  # (K, Hkv)
        return (1.0 - relative.square()).clamp(-FEATURE_CLIP, 1.0).cpu()
    ner_q = normalized_energy_ratio(call.query_spectrum.singular_values, candidates)
    ner_k = normalized_energy_ratio(call.key_spectrum.singular_values, candidates)
    return (0.5 * (per_group(ner_q) + per_group(ner_k))).cpu()


@dataclass(frozen=True)
class ObservationLayout:
    """The observation of DRRL-Attention-v0 (Eq. 6, Eq. 14, budget and context).

    Its parts, in this order:

    * ``sequence_dynamics`` (16): :class:`SequenceDynamics` of the layer's input hidden states (``h_t``);
    * ``weight_statistics`` (9): :func:`layer_weight_statistics` of the layer (``w_t``);
    * ``previous_rank`` (1, or Hkv with per-head ranks): ``r_{t-1} / d`` (``d`` at the first step);
    * ``ner`` (K, or K * Hkv group-major): :func:`candidate_ner` of every candidate rank;
    * ``budget`` (2): the episode's budget (a share of full logit FLOPs; 1 without budget) and the
      share left: the budget not yet spent over the full cost of the remaining steps, i.e. the
      mean rank share the rest of the episode may use;
    * ``context`` (3): depth ``l / (L - 1)``, segment ``s / (S - 1)`` (0 with one segment) and ``eps_t / eps0``;
    * ``sensitivity`` (3K, or 3K * Hkv with per-head ranks; only with ``sensitivity_samples > 0``): what each
      candidate rank costs on this input at this layer and at the later layers, and, one-hot, the candidate
      the hindsight water-fill re-planned from this step gives this layer (or each of its key/value groups:
      :func:`drrl_env.profiles.sensitivity.sensitivity_features`).

    Every entry is clipped to ``[-FEATURE_CLIP, FEATURE_CLIP]``.
    """

    num_candidates: int
    groups: int
    """1, or Hkv with per-head ranks"""
    conv_width: int = 2 * CONV_CHANNELS
    sensitivity: bool = False
    """whether the ``sensitivity`` part is there (the env's ``sensitivity_samples > 0``)"""

    @property
    def widths(self) -> dict[str, int]:
        widths = {
            "sequence_dynamics": self.conv_width,
            "weight_statistics": 9,
            "previous_rank": self.groups,
            "ner": self.num_candidates * self.groups,
            "budget": 2,
            "context": 3,
        }
        if self.sensitivity:
            widths["sensitivity"] = sensitivity_width(self.num_candidates, self.groups)
        return widths

    @property
    def slices(self) -> dict[str, slice]:
        """Where each part lies, e.g. ``obs[layout.slices["ner"]]``."""
        bounds = np.cumsum([0, *self.widths.values()])
        return {name: slice(int(a), int(b)) for name, a, b in zip(self.widths, bounds[:-1], bounds[1:], strict=True)}

    @property
    def space(self) -> spaces.Box:
        return spaces.Box(-FEATURE_CLIP, FEATURE_CLIP, (sum(self.widths.values()),), np.float32)

    def build(self, **parts: np.ndarray | list[float]) -> np.ndarray:
        """Join the named parts (each of its width) into one clipped float32 vector."""
        if set(parts) != set(self.widths):
            raise ValueError(f"observation parts must be {sorted(self.widths)}, got {sorted(parts)}")
        vectors = [np.asarray(parts[name], dtype=np.float64).ravel() for name in self.widths]
        for name, vector in zip(self.widths, vectors, strict=True):
            assert vector.size == self.widths[name], f"{name}: width {vector.size}, expected {self.widths[name]}"
        return np.clip(np.concatenate(vectors), -FEATURE_CLIP, FEATURE_CLIP).astype(np.float32)
