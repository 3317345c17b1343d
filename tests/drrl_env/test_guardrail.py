"""The exact guardrail against explicit n x n logits in float64, and the shared nearest-allowed rule."""

import numpy as np
import pytest
import torch

from drrl_env.attention.hook import AttentionCall
from drrl_env.attention.lowrank import expand_kv_heads
from drrl_env.guardrail import FlopsBudget, combine_masks, nearest_allowed, truncation_errors


def random_call(seed=0, batch=2, hq=4, hkv=2, m=12, n=20, d=8, decay=0.7):
    generator = torch.Generator().manual_seed(seed)
    spread = decay ** torch.arange(d, dtype=torch.float64)  # a decaying spectrum, so ranks matter

    def block(heads, length):
        return torch.randn(batch, heads, length, d, generator=generator, dtype=torch.float64) * spread

    return AttentionCall(0, 0, 1, block(hq, m), block(hkv, n), block(hkv, n), None, d**-0.5)


def explicit_relative_errors(call, ranks, mode):
    """``sqrt(sum ||S - S_r||^2 / sum ||S||^2)`` per key/value group, from the explicit logits."""
    q, k = call.query, expand_kv_heads(call.key, call.query.shape[1] // call.key.shape[1])
    logits = q @ k.transpose(-1, -2) * call.scale  # (B, Hq, m, n)
    hkv = call.key.shape[1]
    rows = []
    for rank in ranks:
        if mode == "separate":
            p_q = torch.linalg.svd(q, full_matrices=False).Vh.transpose(-1, -2)[..., :rank]
            p_k = torch.linalg.svd(k, full_matrices=False).Vh.transpose(-1, -2)[..., :rank]
            approx = (q @ p_q @ p_q.transpose(-1, -2)) @ (k @ p_k @ p_k.transpose(-1, -2)).transpose(-1, -2)
            approx = approx * call.scale
        else:
            u, s, vh = torch.linalg.svd(logits, full_matrices=False)
            approx = u[..., :rank] @ torch.diag_embed(s[..., :rank]) @ vh[..., :rank, :]
        error = (logits - approx).square().sum(dim=(-1, -2))  # (B, Hq)
        total = logits.square().sum(dim=(-1, -2))
        per_group = error.view(error.shape[0], hkv, -1).sum(dim=(0, 2)) / total.view(total.shape[0], hkv, -1).sum(
            dim=(0, 2)
        )
        rows.append(per_group.sqrt())
    return torch.stack(rows)  # (K, Hkv)


@pytest.mark.parametrize("mode", ["separate", "joint"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_errors_equal_explicit_logits_in_float64(mode, seed):
    call = random_call(seed)
    ranks = torch.tensor([1, 2, 3, 5, 8])
    errors = truncation_errors(call, ranks, mode)
    expected = explicit_relative_errors(call, ranks.tolist(), mode)
    assert torch.allclose(errors.relative(per_group=True), expected, rtol=1e-9, atol=1e-12)
    assert errors.relative(per_group=True)[-1].abs().max() < 1e-7  # rank d: no error
    together = errors.relative(per_group=False)
    assert (together[1:] <= together[:-1] + 1e-12).all()  # monotone: a larger rank never errs more


def test_separate_error_is_not_the_eq9_bound():
    """The exact error lies under the Eq. 9 transition bound from full rank (which bounds it)."""
    from drrl_env.guardrail import transition_energies

    call = random_call(4)
    ranks = torch.tensor([2, 4, 6])
    exact = truncation_errors(call, ranks, "separate").relative(per_group=False)
    bound = transition_energies(call, torch.full((2,), 8), ranks, "separate").relative(per_group=False)
    assert (exact <= bound + 1e-12).all() and (exact < 0.9 * bound).any()


@pytest.mark.expensive
@pytest.mark.parametrize("mode", ["separate", "joint"])
def test_exact_errors_on_real_smollm2_attention(mode):
    from agents.figures import captured_call
    from drrl_env.lm.models import DEFAULT_MODEL

    call = captured_call(DEFAULT_MODEL, "wiki", 64, layer=5, device="cpu")
    call = AttentionCall(0, 0, 1, call.query.double(), call.key.double(), call.value.double(), None, call.scale)
    ranks = torch.tensor([8, 16, 32, 48])
    errors = truncation_errors(call, ranks, mode).relative(per_group=True)
    assert torch.allclose(errors, explicit_relative_errors(call, ranks.tolist(), mode), rtol=1e-7, atol=1e-10)


def test_combined_mask_lets_the_budget_win():
    guard = torch.tensor([[False], [False], [True], [True]])
    budget = torch.tensor([[True], [True], [False], [False]])
    assert combine_masks(guard, budget)[:, 0].tolist() == [False, True, False, False]  # largest the budget allows
    assert combine_masks(guard, torch.ones(4, 1, dtype=torch.bool))[:, 0].tolist() == [False, False, True, True]


def test_budget_rejects_infeasible_shares_and_counts_exactly():
    with pytest.raises(ValueError, match="below the smallest candidate's share"):
        FlopsBudget((10, 20), 0.2, (4, 8, 16), kv_heads=2, groups=2, head_dim=16)
    budget = FlopsBudget((10, 20), 0.4, (4, 8, 16), kv_heads=2, groups=2, head_dim=16)
    assert budget.full_units == 30 * 4 * 16  # allowance 0.4 * 1920 = 768 units
    assert budget.mask(0)[:, 0].tolist() == [True, True, False]  # 16: 10*2*32 + 20*2*8 later = 960 > 768
    budget.spent += budget.cost(0, np.array([8, 8]))  # 320 units
    assert budget.mask(1)[:, 0].tolist() == [True, False, False]  # 8: 320 + 20*2*16 = 960 > 768
    assert budget.left_share(1) == pytest.approx((768 - 320) / (20 * 4 * 16))


def test_nearest_allowed_breaks_ties_upward_and_names_an_empty_mask():
    ranks = (4, 8, 12, 16)
    assert nearest_allowed(10, [True, True, True, True], ranks) == 2  # 8 and 12 tie: the larger
    assert nearest_allowed(16, [True, True, False, False], ranks) == 1
    with pytest.raises(ValueError, match="allows no candidate"):
        nearest_allowed(8, [False] * 4, ranks)
