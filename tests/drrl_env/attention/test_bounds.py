import pytest
import torch

from drrl_env.attention.bounds import (
    logit_perturbation_bound,
    normalized_energy_ratio,
    output_perturbation_bound,
    tail_energy_norm,
    transition_norm,
    transition_spectral_norm,
    truncated_product_bound,
)
from drrl_env.attention.lowrank import expand_kv_heads, logit_core_svd, low_rank_qk, truncate_to_rank
from drrl_env.attention.spectra import block_spectrum

D = 16


def random_qk(seed, n=40, hq=4, hkv=2, decay=2.0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, hq, n, D, generator=generator) * torch.logspace(0, -decay, D)
    k = torch.randn(2, hkv, n, D, generator=generator) * torch.logspace(0, -decay, D)
    return q.double(), k.double()


def test_tail_energy_equals_true_truncation_error():
    q, _ = random_qk(0)
    spectrum = block_spectrum(q)
    for r in range(D + 1):
        true_error = torch.linalg.matrix_norm(q - truncate_to_rank(q, spectrum, r))
        assert torch.allclose(tail_energy_norm(spectrum.singular_values, r), true_error, atol=1e-8)


def test_transition_norm_is_exact_in_both_directions():
    q, _ = random_qk(1)
    spectrum = block_spectrum(q)
    for r, r2 in [(2, 9), (9, 2), (5, 5), (0, D)]:
        delta = truncate_to_rank(q, spectrum, r2) - truncate_to_rank(q, spectrum, r)
        assert torch.allclose(
            transition_norm(spectrum.singular_values, r, r2), torch.linalg.matrix_norm(delta), atol=1e-8
        )
        assert torch.allclose(
            transition_spectral_norm(spectrum.singular_values, r, r2), torch.linalg.matrix_norm(delta, ord=2), atol=1e-8
        )


@pytest.mark.parametrize("r", [1, 4, 8, 15])
def test_joint_tail_energy_is_exact_on_the_logits(r):
    q, k = random_qk(2)
    logits = q @ expand_kv_heads(k, 2).transpose(-1, -2)
    _, core_s, _ = logit_core_svd(block_spectrum(q), block_spectrum(k))
    q_low, k_low = low_rank_qk(q, k, r, "joint")
    true_error = torch.linalg.matrix_norm(logits - q_low @ k_low.transpose(-1, -2))
    assert torch.allclose(tail_energy_norm(core_s, r), true_error, rtol=1e-6, atol=1e-8)


def _separate_logits(q, k, r):
    q_low, k_low = low_rank_qk(q, k, r, "separate")
    return q_low @ expand_kv_heads(k_low, q.shape[1] // k.shape[1]).transpose(-1, -2)


def _check_eq9(q, k, pairs):
    scale = D**-0.5
    qs, ks = block_spectrum(q), block_spectrum(k)
    slack = []
    for r, r2 in pairs:
        delta = (_separate_logits(q, k, r2) - _separate_logits(q, k, r)) * scale
        for norm, ord_ in (("fro", "fro"), ("2", 2)):
            bound = logit_perturbation_bound(qs.singular_values, ks.singular_values, r, r2, scale, norm)
            true = torch.linalg.matrix_norm(delta, ord=ord_)
            assert bool((bound >= true * (1 - 1e-6) - 1e-9).all()), (r, r2, norm)
            slack.append(float((bound / true.clamp_min(1e-12)).min()))
    return slack


def test_eq9_bounds_the_true_logit_perturbation_on_random_blocks():
    pairs = [(1, 2), (4, 12), (12, 4), (8, D), (1, D)]
    for seed in range(5):
        q, k = random_qk(seed)
        _check_eq9(q, k, pairs)


def test_eq9_frobenius_form_needs_frobenius_transition_norms():
    """The bound as printed (spectral norms of dQ, dK) does not bound the Frobenius norm of dA."""
    q, _ = random_qk(7, n=400, hq=2, hkv=2, decay=0.0)  # flat spectrum: many singular values in the transition
    k = q.clone()  # aligned subspaces: the transition's logit terms add up instead of cancelling
    scale = D**-0.5
    qs, ks = block_spectrum(q), block_spectrum(k)
    printed = logit_perturbation_bound(qs.singular_values, ks.singular_values, 2, 14, scale, "2")
    true_fro = torch.linalg.matrix_norm((_separate_logits(q, k, 14) - _separate_logits(q, k, 2)) * scale)
    assert bool((printed < true_fro).any())


@pytest.mark.expensive
def test_eq9_bounds_the_true_logit_perturbation_on_smollm2(default_model):
    from drrl_env.attention.hook import install

    captured = []

    def capture(call):
        if call.layer in (0, 15, 29):
            captured.append((call.query.double(), call.key.double()))
        return call.full()

    ids = torch.arange(1000, 1128).view(1, 128)
    with install(default_model.model).use(capture):
        default_model.model(input_ids=ids)
    assert len(captured) == 3
    for q, k in captured:
        _check_eq9(q, k, [(16, 24), (32, 64), (64, 16), (48, 56)])


def test_output_bound_eq10_bounds_the_attention_output_change():
    scale = D**-0.5
    for seed in range(4):
        q, k = random_qk(seed, hq=2, hkv=2)
        v = torch.randn(2, 2, 40, D, generator=torch.Generator().manual_seed(100 + seed)).double()
        vs = block_spectrum(v)
        mask = torch.ones(40, 40, dtype=torch.bool).tril()
        for r, r2 in [(2, 6), (6, D), (12, 3)]:
            outs = []
            for rank in (r, r2):
                scores = (_separate_logits(q, k, rank) * scale).masked_fill(~mask, float("-inf"))
                outs.append(torch.softmax(scores, -1) @ v)
            true = torch.linalg.matrix_norm(outs[1] - outs[0])
            qs, ks = block_spectrum(q), block_spectrum(k)
            logit_bound = logit_perturbation_bound(qs.singular_values, ks.singular_values, r, r2, scale, "fro")
            assert bool((output_perturbation_bound(logit_bound, vs.spectral_norm) >= true - 1e-9).all())


def test_eq5_truncated_product_bound():
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(30, 30, generator=generator, dtype=torch.float64)
    v = torch.randn(30, 8, generator=generator, dtype=torch.float64)
    spectrum = block_spectrum(a)
    for r, r2 in [(0, 5), (3, 20), (10, 11)]:
        delta = (truncate_to_rank(a, spectrum, r2) - truncate_to_rank(a, spectrum, r)) @ v
        bound = truncated_product_bound(spectrum.singular_values, r, torch.linalg.matrix_norm(v))
        assert float(bound) >= float(torch.linalg.matrix_norm(delta)) - 1e-9


def test_ner_is_monotone_from_zero_to_one_and_handles_zero_spectra():
    q, _ = random_qk(4)
    ner = normalized_energy_ratio(block_spectrum(q).singular_values)
    assert ner.shape[-1] == D + 1
    assert torch.allclose(ner[..., 0], ner.new_zeros(())) and torch.allclose(ner[..., -1], ner.new_ones(()))
    assert bool((ner[..., 1:] >= ner[..., :-1] - 1e-12).all())
    assert torch.allclose(normalized_energy_ratio(torch.zeros(3, D), 4), torch.ones(3, dtype=torch.float32))
    # candidate axis: ranks (K, 1, 1) against spectra (B, H, d)
    candidates = torch.tensor([4, 8]).view(2, 1, 1)
    assert normalized_energy_ratio(block_spectrum(q).singular_values, candidates).shape == (2, 2, 4)
