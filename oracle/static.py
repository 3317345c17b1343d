"""Static per-layer rank allocation: the strongest baseline that does not adapt to the input.

It profiles, on validation text, the KL from the full model's next-token distribution that each
layer alone costs at each candidate rank (all other layers at full attention;
:func:`drrl_env.profiles.kl.layer_kl_profile`, label-free), averages the profile over the
validation batches, and spends a budget of logit FLOPs (the env's ``flops_budget`` unit: a layer
at rank ``r`` costs ``r / d``) by the marginal water-fill of :func:`drrl_env.profiles.waterfill.allocate_ranks`.
The hindsight oracle does the same on each input's own profile; an input-adaptive agent has to
beat this allocation (and uniform ranks) at equal FLOPs for adaptivity to mean anything.

The ``decode`` estimate profiles generation with a low-rank key cache instead of a prefill
(:func:`drrl_env.generation.decode_profile.decode_kl_profile`, basis = the env's spectral mode): the allocation
to use for ``python -m agents.generate`` (a prefill profile does not transfer there; measured).
Profiles are cached in memory and on disk (:func:`drrl_env.profiles.validation.validation_profile`).
"""

from __future__ import annotations

import numpy as np

from drrl_env.config import check_budget_share
from drrl_env.env import DRRLAttentionEnv, EnvConfig
from drrl_env.lm.corpora import DEFAULT_CORPUS, EVALUATION_ONLY
from drrl_env.profiles.kl import PROFILE_ESTIMATES
from drrl_env.profiles.validation import validation_profile
from drrl_env.profiles.waterfill import allocate_ranks, rank_shares
from oracle.hindsight import LayerAllocationPolicy

STATIC_ESTIMATES = (*PROFILE_ESTIMATES, "decode")
"""how the validation profile is measured: a prefill's (exact, its Fisher estimate) or generation's (decode)"""


class StaticAllocation(LayerAllocationPolicy):
    """One fixed candidate index per layer, whatever the input: the water-fill of a validation profile.

    ``budget`` is a share of full attention's logit FLOPs; None spends each episode's own budget
    (``env.budget_share``), as ``uniform`` does. ``estimate`` says how the profile was measured.
    """

    def __init__(
        self, budget: float | None, cost: np.ndarray, ranks: tuple[int, ...], head_dim: int, estimate: str = "exact"
    ) -> None:
        super().__init__()
        self.budget, self.estimate = budget, estimate
        self.cost = cost  # (L, K) mean per-token KL of each layer alone at each candidate rank, on validation text
        self.ranks, self.head_dim = ranks, head_dim
        self._allocations: dict[float, list[int]] = {}

    @property
    def name(self) -> str:
        budget = "" if self.budget is None else f":{self.budget:g}"
        return "static" + budget + ("" if self.estimate == "exact" else f":{self.estimate}")

    def allocation(self, budget: float) -> list[int]:
        """Candidate index per layer for ``budget`` (cached)."""
        if budget not in self._allocations:
            self._allocations[budget] = allocate_ranks(self.cost, rank_shares(self.ranks, self.head_dim), budget)
        return self._allocations[budget]

    def allocate(self, env: DRRLAttentionEnv) -> list[int]:
        budget = self.budget if self.budget is not None else env.budget_share
        return self.allocation(1.0 if budget is None else budget)

    @classmethod
    def profile(
        cls,
        budget: float | None,
        env_kwargs: dict,
        max_tokens: int = 2048,
        progress: bool = True,
        estimate: str = "exact",
    ) -> StaticAllocation:
        """Profile each layer's KL at each candidate rank on validation text; allocate ``budget`` (None: per episode).

        The validation split of the env's corpus is used, or of the default corpus for an
        evaluation-only corpus (news, shakespeare): the allocation is chosen on text other than
        the text it is evaluated on. ``max_tokens`` validation tokens are profiled (at least one sequence of
        ``seq_len``); the ``decode`` estimate profiles ``max_tokens // seq_len`` prompts of ``seq_len``
        (at least one, at most ``DECODE_PROFILE_PROMPTS``), each with a continuation of ``DECODE_PROFILE_TOKENS``.
        """
        if budget is not None:
            check_budget_share("budget", budget)
        if estimate not in STATIC_ESTIMATES:
            raise ValueError(f"profile estimate must be one of {STATIC_ESTIMATES}, got {estimate!r}")
        config = EnvConfig(**env_kwargs)
        max_tokens = max(max_tokens, config.seq_len)  # at least one sequence, however long
        corpus = DEFAULT_CORPUS if config.corpus in EVALUATION_ONLY else config.corpus
        args = (config.model, corpus, config.seq_len, config.segment_len, config.ranks, config.spectral_mode)
        cost, head_dim = validation_profile(*args, config.device, max_tokens, progress, estimate)
        return cls(budget, cost, config.ranks, head_dim, estimate)
