"""Per-step credit of the kl reward: each step earns what it changes in the KL of its teacher-completed plan.

With ``kl_baseline="waterfill"`` the return of an episode is ``KL_0 - KL`` (or ``log(KL_0 / KL)``): what the
policy's allocation gains over the water-fill of the episode's own sensitivity profile (its hindsight teacher's
allocation) on the same batch. Given only at the last step, one number has to tell the policy which of its ~30
layer decisions (~90 with per-head ranks) made it. ``kl_credit="completion"`` spreads it exactly over the steps
that caused it, as the potential-based shaping of Ng et al. (1999) with the potential

    Phi(s_t) = -KL(plan_t),     plan_t = the ranks taken at steps < t, then the teacher's completion,       (Eq. C)

where the completion water-fills the budget left at step ``t`` over the rest of the profile. Step ``t``
earns ``Phi(s_{t+1}) - Phi(s_t)``: zero when it takes the plan's rank (the plan stands, no forward pass),
otherwise the change in KL of re-planning the rest from its choice (one forward pass of the model on the
batch). The sum over the episode telescopes to the terminal reward (``Phi`` of the last state is the
episode's own KL), so the optimal policy is unchanged; what changes is that a deviation is credited where it
was made, with its consequence under the teacher's completion (a budget spent here is taken from the
layers the teacher values least). ``Phi`` is a function of the ranks taken so far, i.e. of the MDP's state.

``kl_credit="model"`` scores plans by the additive model of the profile instead of a forward pass,

    Phi(s_t) = -KL_A(plan_t),   KL_A(plan) = sum over layers (and key/value groups) of profile[l, rank_l],  (Eq. A)

for t < T, so no step costs a forward pass; the last step pays the terminal reward less what the steps paid,
so the return is the terminal reward exactly, as with Eq. C, and the optimal policy is unchanged. Under the
additive model the teacher's water-fill is optimal, so every deviation earns a negative step credit; where the
model is wrong, the last step's residual (the exact KL against the model's) says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from drrl_env.profiles.waterfill import waterfill_plan
from drrl_env.reward import kl_terminal_reward

Plan = list  # a rank per layer, or per layer a list of one rank per key/value group


def additive_plan_kl(profile: np.ndarray, ranks: tuple[int, ...], plan: Plan) -> float:
    """Eq. A: the additive model's KL of ``plan``, the sum of ``profile[l, (u,) k]`` at each chosen rank.

    ``profile``: ``(L, K)`` with a rank per layer in ``plan``, or ``(L, U, K)`` with ``U`` ranks per layer.
    """
    column = {rank: k for k, rank in enumerate(ranks)}
    chosen = np.vectorize(column.__getitem__, otypes=[np.int64])(np.asarray(plan))
    return float(np.take_along_axis(profile, chosen[..., None], axis=-1).sum())


@dataclass
class CompletionCredit:
    """The potential of Eq. C over one episode.

    Attributes:
        profile: ``(L, K)`` or ``(L, Hkv, K)`` sensitivity profile of the episode's batch.
        ranks: the sorted candidate ranks; ``head_dim`` the model's ``d``.
        plan: the current plan (at the start: the teacher's water-fill of the whole budget).
        score: the KL of a plan on the episode's batch: from the full model (one forward pass; Eq. C) or the
            additive model of the profile (Eq. A).
        baseline: the env's ``kl_baseline`` ('waterfill': differences of KL; 'waterfill_log_ratio': of log KL).
        exact: ``score`` is the exact KL (Eq. C), not a model of it (Eq. A).
        forwards: forward passes spent on scoring plans so far (0 with a model).
        initial_kl: ``score`` of the teacher's plan.
    """

    profile: np.ndarray
    ranks: tuple[int, ...]
    head_dim: int
    plan: Plan
    score: Callable[[Plan], float]
    baseline: str
    exact: bool = True
    forwards: int = field(default=0, init=False)
    initial_kl: float | None = field(default=None, init=False)
    _kl: float | None = field(default=None, init=False)

    def plan_kl(self) -> float:
        """KL of the current plan (scored once per plan)."""
        if self._kl is None:
            self._kl = self.score(self.plan)
            self.forwards += int(self.exact)
            if self.initial_kl is None:
                self.initial_kl = self._kl
        return self._kl

    def step(self, layer: int, taken: int | list[int], budget_left: float) -> float:
        """``Phi(s_{t+1}) - Phi(s_t)`` of the step that took ranks ``taken`` at ``layer`` (not the last layer).

        ``budget_left``: the mean rank share the layers after ``layer`` may use (``FlopsBudget.left_share``).
        """
        if taken == self.plan[layer]:
            return 0.0
        before = self.plan_kl()
        rest = waterfill_plan(self.profile[layer + 1 :], self.ranks, self.head_dim, budget_left)
        self.plan, self._kl = [*self.plan[:layer], taken, *rest], None
        return kl_terminal_reward(self.plan_kl(), before, self.baseline)

    def finish(self, kl: float, teacher_kl: float | None = None) -> float:
        """The last step's credit, so that the episode's credits sum to its terminal reward.

        Exact (Eq. C): ``Phi(s_T) - Phi(s_{T-1})`` with ``Phi(s_T) = -kl``, the episode's own KL. Model (Eq. A):
        the terminal reward against ``teacher_kl`` (the exact KL of the teacher's plan) less what the steps paid.
        """
        last_plan_kl = self.plan_kl()
        if self.exact:
            return kl_terminal_reward(kl, last_plan_kl, self.baseline)
        if teacher_kl is None:
            raise ValueError("a model credit's last step needs the exact KL of the teacher's plan")
        paid = kl_terminal_reward(last_plan_kl, self.initial_kl, self.baseline)  # the steps' credits telescope
        return kl_terminal_reward(kl, teacher_kl, self.baseline) - paid
