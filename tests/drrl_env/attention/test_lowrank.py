import pytest
import torch

from drrl_env.attention.lowrank import (
    attend,
    causal_mask,
    expand_kv_heads,
    full_attention,
    low_rank_attention,
    low_rank_qk,
    truncate_to_rank,
)
from drrl_env.attention.spectra import block_spectrum

B, HQ, HKV, N, D = 2, 6, 2, 48, 16


@pytest.fixture
def qkv():
    torch.manual_seed(0)
    q = torch.randn(B, HQ, N, D) * torch.logspace(0.5, -1, D)
    k = torch.randn(B, HKV, N, D) * torch.logspace(0.5, -1, D)
    v = torch.randn(B, HKV, N, D)
    return q, k, v


def reference_attention(q, k, v, scale, mask=None):
    """Float64 eager attention with explicit repeat_kv and bottom-right causal mask."""
    groups = q.shape[1] // v.shape[1]
    k = expand_kv_heads(k, q.shape[1] // k.shape[1]).double()
    v = expand_kv_heads(v, groups).double()
    scores = q.double() @ k.transpose(-1, -2) * scale
    allowed = causal_mask(q.shape[-2], k.shape[-2], q.device) if mask is None else mask
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1) @ v


def test_full_attention_matches_reference(qkv):
    q, k, v = qkv
    assert torch.allclose(full_attention(q, k, v).double(), reference_attention(q, k, v, D**-0.5), atol=1e-5)


@pytest.mark.parametrize("mode", ["separate", "joint"])
def test_full_rank_reproduces_full_attention(qkv, mode):
    q, k, v = qkv
    assert torch.allclose(low_rank_attention(q, k, v, D, mode), full_attention(q, k, v), atol=1e-5)


@pytest.mark.parametrize("rank", [1, 4, 9])
def test_separate_mode_equals_explicit_truncation(qkv, rank):
    q, k, v = qkv
    q_r = truncate_to_rank(q.double(), block_spectrum(q), rank)
    k_r = truncate_to_rank(k.double(), block_spectrum(k), rank)
    expected = reference_attention(q_r, k_r, v, D**-0.5)
    assert torch.allclose(low_rank_attention(q, k, v, rank, "separate").double(), expected, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 4, 9])
def test_joint_mode_is_eckart_young_on_the_logits(qkv, rank):
    q, k, v = qkv
    logits = q.double() @ expand_kv_heads(k, HQ // HKV).double().transpose(-1, -2)  # (B, HQ, N, N)
    u, s, vh = torch.linalg.svd(logits)
    best = u[..., :rank] * s[..., None, :rank] @ vh[..., :rank, :]
    q_low, k_low = low_rank_qk(q, k, rank, "joint")
    assert q_low.shape[-1] == rank and k_low.shape[-1] == rank
    approx = q_low.double() @ k_low.double().transpose(-1, -2)
    assert torch.allclose(approx, best, atol=1e-4 * float(s.max()))
    # and the attention built from it equals attention over the best rank-r logits
    scores = (best * D**-0.5).masked_fill(~causal_mask(N, N, "cpu"), float("-inf"))
    expected = torch.softmax(scores, -1) @ expand_kv_heads(v, HQ // HKV).double()
    assert torch.allclose(low_rank_attention(q, k, v, rank, "joint").double(), expected, atol=1e-4)


def test_joint_beats_separate_on_logit_error(qkv):
    q, k, v = qkv
    logits = q.double() @ expand_kv_heads(k, HQ // HKV).double().transpose(-1, -2)
    errors = {}
    for mode in ("separate", "joint"):
        q_low, k_low = low_rank_qk(q, k, 4, mode)
        groups = q_low.shape[1] // k_low.shape[1]
        approx = q_low.double() @ expand_kv_heads(k_low, groups).double().transpose(-1, -2)
        errors[mode] = float(torch.linalg.matrix_norm(approx - logits).sum())
    assert errors["joint"] < errors["separate"]


@pytest.mark.parametrize("mode", ["separate", "joint"])
def test_per_head_ranks_equal_per_head_computation(qkv, mode):
    q, k, v = qkv
    ranks = torch.tensor([3, 11])
    out = low_rank_attention(q, k, v, ranks, mode)
    groups = HQ // HKV
    for g, r in enumerate(ranks.tolist()):
        heads = slice(g * groups, (g + 1) * groups)
        single = low_rank_attention(q[:, heads], k[:, g : g + 1], v[:, g : g + 1], r, mode)
        assert torch.allclose(out[:, heads], single, atol=1e-5)


@pytest.mark.parametrize("mode", ["separate", "joint"])
def test_segment_queries_use_bottom_right_causal_mask(qkv, mode):
    q, k, v = qkv
    m = 10
    segment = low_rank_attention(q[:, :, -m:], k, v, D, mode)
    assert torch.allclose(segment, full_attention(q, k, v)[:, :, -m:], atol=1e-5)


def test_padding_mask_is_respected(qkv):
    q, k, v = qkv
    mask = causal_mask(N, N, "cpu").expand(B, 1, N, N).clone()
    mask[0, :, :, :5] = False  # left padding of 5 tokens in sequence 0
    mask[0, :, :5, 0] = True  # HF keeps padded query rows finite
    expected = reference_attention(q, k, v, D**-0.5, mask)
    assert torch.allclose(full_attention(q, k, v, mask=mask).double(), expected, atol=1e-5)
    assert torch.allclose(low_rank_attention(q, k, v, D, "joint", mask=mask).double(), expected, atol=1e-4)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("k_heads", [2, 4])
def test_unequal_width_attend_matches_reference(fused, k_heads):
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 4, 20, 5), torch.randn(1, k_heads, 20, 5), torch.randn(1, 2, 20, 8)
    ref = reference_attention(q, k, v, 0.3)
    assert torch.allclose(attend(q, k, v, 0.3, fused=fused).double(), ref, atol=1e-5)
    mask = causal_mask(20, 20, "cpu").expand(1, 1, 20, 20).clone()
    mask[..., :3] = False
    mask[..., :3, 0] = True
    ref = reference_attention(q, k, v, 0.3, mask)
    assert torch.allclose(attend(q, k, v, 0.3, mask, fused=fused).double(), ref, atol=1e-5)


def test_bad_rank_is_rejected(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="ranks must lie in"):
        low_rank_attention(q, k, v, D + 1)
    with pytest.raises(ValueError, match="one entry per key/value head"):
        low_rank_attention(q, k, v, [4, 4, 4])
    with pytest.raises(ValueError, match="spectral mode"):
        low_rank_attention(q, k, v, 4, "bogus")


def test_degenerate_inputs_give_finite_outputs():
    q = torch.zeros(1, 2, 12, 8)
    k = torch.randn(1, 2, 12, 1) @ torch.randn(1, 2, 1, 8)
    v = torch.randn(1, 2, 12, 8)
    for mode in ("separate", "joint"):
        for rank in (1, 4, 8):
            assert torch.isfinite(low_rank_attention(q, k, v, rank, mode)).all()
