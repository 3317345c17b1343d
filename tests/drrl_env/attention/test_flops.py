import pytest
import torch

from drrl_env.attention.flops import attended_pairs, full_attention_flops, low_rank_attention_flops
from drrl_env.attention.lowrank import causal_mask


@pytest.mark.parametrize("m,n", [(1, 1), (5, 5), (4, 10), (64, 256)])
def test_attended_pairs_count_the_causal_mask(m, n):
    assert attended_pairs(m, n) == int(causal_mask(m, n, "cpu").sum())
    assert attended_pairs(m, n, causal=False) == m * n


def test_low_rank_core_at_full_rank_equals_full_core_and_falls_with_rank():
    full = full_attention_flops(2, 9, 512, 512, 64)
    for mode in ("separate", "joint"):
        at_full = low_rank_attention_flops(2, 9, 3, 512, 512, 64, 64, mode)
        assert at_full.core == pytest.approx(full.core)
        cores = [low_rank_attention_flops(2, 9, 3, 512, 512, 64, r, mode).core for r in (16, 32, 48, 64)]
        assert cores == sorted(cores) and cores[0] < cores[-1]
        assert at_full.overhead > 0
    # the value product is never truncated: at best half the logits+values cost remains
    r16 = low_rank_attention_flops(2, 9, 3, 512, 512, 64, 16)
    assert r16.logits == pytest.approx(full.logits * 16 / 64)
    assert r16.values == pytest.approx(full.values)


def test_per_head_ranks_sum_exactly():
    mixed = low_rank_attention_flops(1, 9, 3, 128, 128, 64, torch.tensor([16, 32, 48]), "separate")
    uniform = low_rank_attention_flops(1, 9, 3, 128, 128, 64, 32, "separate")
    assert mixed.logits == pytest.approx(uniform.logits)


def test_bad_mode_and_lengths_are_rejected():
    with pytest.raises(ValueError, match="spectral mode"):
        low_rank_attention_flops(1, 9, 3, 8, 8, 64, 16, "svd")
    with pytest.raises(ValueError, match="q_len"):
        attended_pairs(9, 8)


def test_generation_flops_count_prefill_once_and_every_decode_step():
    from drrl_env.attention.flops import key_cache_generation_flops

    full = key_cache_generation_flops(2, 9, 3, 100, 5, 64, 64)
    assert full.prefill == full_attention_flops(2, 9, 100, 100, 64)
    contexts = sum(100 + t for t in range(1, 6))
    assert full.decode.logits == full.decode.values == 2 * 2 * 9 * 64 * contexts
    assert full.decode.overhead == 0 and full.prefill.overhead == 0
    low = {
        basis: key_cache_generation_flops(2, 9, 3, 100, 5, 64, 32, basis)
        for basis in ("separate", "joint", "calibrated")
    }
    for flops in low.values():
        assert flops.decode.logits == full.decode.logits / 2 and flops.decode.values == full.decode.values
        assert flops.decode.projections == 2 * 5 * 2 * 64 * 32 * (9 + 3)
    assert low["calibrated"].prefill.spectra == 0 < low["separate"].prefill.spectra < low["joint"].prefill.spectra
    windowed = key_cache_generation_flops(2, 9, 3, 100, 5, 64, 32, "joint", 1, 4, exact_prefill=True)
    assert windowed.decode.logits == low["joint"].decode.logits + 2 * 2 * 5 * 5 * 9 * 64  # 5 exact keys per step
    assert windowed.prefill.logits == full.prefill.logits and windowed.prefill.spectra == low["joint"].prefill.spectra
    assert windowed.prefill.projections == 2 * 2 * 100 * 64 * 32 * 3  # only the prompt's keys are projected
    per_head = key_cache_generation_flops(1, 9, 3, 10, 2, 64, torch.tensor([16, 32, 48]), "calibrated")
    assert per_head.decode.logits == key_cache_generation_flops(1, 9, 3, 10, 2, 64, 32, "calibrated").decode.logits
    with pytest.raises(ValueError, match="basis must be"):
        key_cache_generation_flops(1, 9, 3, 10, 2, 64, 32, "pca")
