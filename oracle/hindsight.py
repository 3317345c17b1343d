"""The hindsight oracle: the per-input layer allocation that knows what each layer's rank costs on this very input.

For the episode's batch, :func:`layer_kl_profile` measures ``cost[l, k]``: the mean per-token
``KL(p_full || p)`` of the next-token distribution when layer ``l`` alone runs at candidate rank
``k`` and every other layer at full attention. It uses no labels: only the model's own
distributions on the input, so choosing on it does not fit the noise of the tokens it is scored
on (a profile of the LM loss does; see docs/findings.md). :func:`allocate_ranks` then spends the
episode's budget by the marginal water-fill: starting from the largest candidate everywhere, it
lowers, one candidate at a time, the layer whose ``cost increase / FLOPs saved`` is smallest,
until the mean FLOPs share meets the budget. Under the additive model (the KL of several layers
at once is about the sum of their single-layer KLs) this is the best layer allocation for the
input, so its gap to an allocation that does not see the input (uniform, static) is the headroom
any input-adaptive agent can aim at.

Cost: one full forward, then per layer ``l`` one forward of the batch replicated once per
candidate below full rank, in which the layers before ``l`` do not run: they hand on the output
the full forward recorded (prefix reuse), and the candidates' outputs at layer ``l`` come from one
set of spectra of the original rows. That is about ``L * (K - 1) / 2`` sequence-forwards of the
decoder (plus ``L * (K - 1)`` of the LM head) per batch.
"""

from __future__ import annotations

import numpy as np

from drrl_env.env import DRRLAttentionEnv
from drrl_env.guardrail import nearest_allowed, nearest_allowed_per_group
from drrl_env.profiles.kl import FISHER_SAMPLES, PROFILE_ESTIMATES, kl_profile
from drrl_env.profiles.waterfill import rank_shares, waterfill_indices


class LayerAllocationPolicy:
    """A rank policy that fixes one candidate per layer at each episode's first step, then plays it.

    Subclasses say how in :meth:`allocate`; where the mask forbids a layer's candidate, the
    nearest allowed one is taken. In a ``per_head`` env an allocation's entry per layer may be a
    list of one candidate per key/value group (each group then takes the nearest allowed in its
    part of the group-major mask); a single index is played in every group.
    """

    def __init__(self) -> None:
        self._allocation: list | None = None

    def reset(self, seed: int) -> None:
        del seed
        self._allocation = None

    def allocate(self, env: DRRLAttentionEnv) -> list:
        """Candidate index per layer (or per layer and key/value group) for the episode ``env`` has just started."""
        raise NotImplementedError

    def act(self, observation: np.ndarray, action_mask: np.ndarray, env: DRRLAttentionEnv) -> int | np.ndarray:
        call, ranks = env.attention_call, env.config.ranks
        if self._allocation is None or (call.layer, call.segment) == (0, 0):
            self._allocation = self.allocate(env)
        chosen = self._allocation[call.layer]
        if not env.config.per_head:
            return nearest_allowed(ranks[chosen], action_mask, ranks)
        return nearest_allowed_per_group(np.asarray(ranks)[np.asarray(chosen)], action_mask, ranks)


class HindsightOracle(LayerAllocationPolicy):
    """The hindsight oracle as a rank policy: :func:`allocate_ranks` on this episode's :func:`layer_kl_profile`.

    At an episode's first step it profiles the episode's batch (``env.input_ids``) and allocates
    the episode's budget (``env.budget_share``, in shares of full attention's logit FLOPs, so a
    layer at rank ``r`` costs ``r / d``); then it plays the allocation, taking the nearest allowed
    candidate where the mask forbids a choice. Needs a ``flops_budget``. In a ``per_head`` env it
    profiles and allocates each key/value group of each layer as a unit (:func:`unit_kl_profile`, or its
    Fisher estimate), where the headroom is largest (docs/findings.md).
    ``estimate="fisher"`` profiles by :func:`drrl_env.profiles.sensitivity.fisher_kl_profile` with ``samples`` label
    samples (``hindsight:fisher``, ``hindsight:fisher:S``); ``estimate="scaled_delta"`` by
    :func:`drrl_env.profiles.delta_scale.scaled_delta_profile` (one forward per input; ``samples`` fit its scale on
    validation text). Where the env already shows that estimate (the same ``sensitivity_estimate`` and
    ``sensitivity_samples == samples``) it is reused.
    """

    def __init__(self, estimate: str = "exact", samples: int = FISHER_SAMPLES) -> None:
        super().__init__()
        if estimate not in PROFILE_ESTIMATES:
            raise ValueError(f"profile estimate must be one of {PROFILE_ESTIMATES}, got {estimate!r}")
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
        self.estimate, self.samples = estimate, samples
        self.last_profile: np.ndarray | None = None
        self.profile_flops = 0.0
        """FLOPs estimate of the last episode's profile (``env.profile_flops``; 0 for the exact one, a ceiling)"""

    @property
    def name(self) -> str:
        if self.estimate == "exact":
            return "hindsight"
        name = f"hindsight:{self.estimate}"
        return name if self.samples == FISHER_SAMPLES else f"{name}:{self.samples}"

    def allocate(self, env: DRRLAttentionEnv) -> list:
        config = env.config
        if env.budget_share is None:
            raise ValueError("the hindsight oracle allocates a FLOPs budget: give the env a flops_budget")
        shown = (config.sensitivity_estimate, config.sensitivity_samples)
        if shown == (self.estimate, self.samples):
            self.last_profile = env.sensitivity_profile  # the same estimate, already made for the observation
        else:
            self.last_profile = kl_profile(
                env.loaded,
                env.input_ids,
                config.ranks,
                config.spectral_mode,
                config.segment_len,
                self.estimate,
                per_head=config.per_head,
                samples=self.samples,
            )  # (L, K), or (L, Hkv, K) per head
        self.profile_flops = 0.0 if self.estimate == "exact" else env.profile_flops(self.estimate, self.samples)
        return waterfill_indices(self.last_profile, rank_shares(config.ranks, env.head_dim), env.budget_share)
