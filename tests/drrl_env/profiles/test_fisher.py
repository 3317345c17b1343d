import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from drrl_env.attention.hook import AttentionCall, install
from drrl_env.lm.models import LoadedModel
from drrl_env.profiles.kl import layer_kl_profile, unit_kl_profile
from drrl_env.profiles.sensitivity import delta_energy_profile, fisher_kl_profile
from tests.conftest import sharpen_first_layer, tiny_llama

RANKS = (2, 4, 8, 12, 16)


def sharp_tiny_llama(dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Tiny Llama (vocab 1000, 2 layers) with layer 0's W_Q, W_K scaled by 8: low ranks cost something there."""
    model = sharpen_first_layer(tiny_llama(vocab_size=1000, num_layers=2).to(dtype))
    return LoadedModel("tiny", model, tokenizer=None)


def second_order_kl(
    loaded: LoadedModel, ids: torch.Tensor, layer: int, rank: int, mode: str, group: int | None = None
) -> float:
    """``1/2 dz^T F dz`` per token in float64, ``dz`` the logits' directional derivative along layer's delta.

    ``group``: only that key/value group at ``rank`` (the others full), as a per-head profile cell.
    """
    hook = install(loaded.model)
    shape = loaded.attention_shape
    ranks = torch.full((1, shape.kv_heads), rank if group is None else shape.head_dim)
    if group is not None:
        ranks[0, group] = rank

    def along(step: float):
        def handler(call: AttentionCall) -> torch.Tensor:
            full = call.full()
            return full + step * (call.low_rank(ranks, mode)[0] - full) if call.layer == layer else full

        return handler

    step = 1e-4
    with torch.no_grad():
        with hook.use(along(0.0)):
            p = torch.softmax(loaded.model(input_ids=ids).logits, -1)
        with hook.use(along(step)):
            plus = loaded.model(input_ids=ids).logits
        with hook.use(along(-step)):
            minus = loaded.model(input_ids=ids).logits
    dz = (plus - minus) / (2 * step)  # (B, n, V)
    fisher = (p * dz**2).sum(-1) - (p * dz).sum(-1) ** 2
    return float(0.5 * fisher.mean())


@pytest.mark.expensive
@pytest.mark.parametrize("mode", ["separate", "joint"])
def test_fisher_estimate_converges_to_the_second_order_kl(mode):
    loaded = sharp_tiny_llama(torch.float64)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    estimate = fisher_kl_profile(loaded, ids, RANKS, mode, samples=2000)
    for rank_index, rank in enumerate(RANKS[:2]):
        reference = second_order_kl(loaded, ids, 0, rank, mode)
        assert reference > 1e-5
        # 2000 samples of a chi-square variable: relative spread about sqrt(2 / 2000) = 3 %
        assert estimate[0, rank_index] == pytest.approx(reference, rel=0.12), rank
    assert (estimate[:, -1] == 0).all()


@pytest.mark.expensive
@pytest.mark.parametrize("mode", ["joint"])
def test_per_head_fisher_estimate_converges_to_each_groups_second_order_kl(mode):
    loaded = sharp_tiny_llama(torch.float64)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    estimate = fisher_kl_profile(loaded, ids, RANKS, mode, samples=2000, per_head=True)
    assert estimate.shape == (2, loaded.attention_shape.kv_heads, len(RANKS))
    for group in range(loaded.attention_shape.kv_heads):
        for rank_index, rank in enumerate(RANKS[:2]):
            reference = second_order_kl(loaded, ids, 0, rank, mode, group)
            assert reference > 1e-6
            assert estimate[0, group, rank_index] == pytest.approx(reference, rel=0.12), (group, rank)
    assert (estimate[..., -1] == 0).all()
    layer_estimate = fisher_kl_profile(loaded, ids, RANKS, mode, samples=2000)
    assert not np.allclose(estimate.sum(1), layer_estimate, rtol=1e-3)  # a group's estimate is not a layer share


@pytest.mark.parametrize("mode, segment_len", [("separate", None), ("joint", 8)])
def test_per_head_fisher_estimate_ranks_cells_like_the_exact_unit_profile(mode, segment_len):
    loaded = sharp_tiny_llama()
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    exact = unit_kl_profile(loaded, ids, RANKS, mode, segment_len, per_head=True)
    estimate = fisher_kl_profile(loaded, ids, RANKS, mode, segment_len, samples=64, seed=1, per_head=True)
    assert estimate.shape == exact.shape and (estimate >= 0).all()
    cells = exact[..., :-1].ravel() > 1e-6
    assert spearmanr(exact[..., :-1].ravel()[cells], estimate[..., :-1].ravel()[cells])[0] > 0.7  # 4-8 cells
    assert np.allclose(estimate, exact, rtol=0.5, atol=2e-5)  # second order, where the exact KL is small


@pytest.mark.parametrize("mode, segment_len", [("separate", None), ("joint", 8)])
def test_fisher_estimate_ranks_cells_like_the_exact_profile(mode, segment_len):
    loaded = sharp_tiny_llama()
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    exact = layer_kl_profile(loaded, ids, RANKS, mode, segment_len)
    estimate = fisher_kl_profile(loaded, ids, RANKS, mode, segment_len, samples=64, seed=1)
    assert estimate.shape == exact.shape and (estimate >= 0).all()
    cells = exact[:, :-1].ravel() > 1e-6
    assert spearmanr(exact[:, :-1].ravel()[cells], estimate[:, :-1].ravel()[cells])[0] > 0.9
    assert np.allclose(estimate, exact, rtol=0.5, atol=2e-5)  # second order, where the exact KL is small
    again = fisher_kl_profile(loaded, ids, RANKS, mode, segment_len, samples=64, seed=1)
    assert np.array_equal(again, estimate)  # same seed, same labels
    assert all(parameter.requires_grad is False for parameter in loaded.model.parameters())


def test_fisher_restores_gradient_flags_and_rejects_no_samples():
    loaded = sharp_tiny_llama()
    loaded.model.requires_grad_(True)
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    fisher_kl_profile(loaded, ids, RANKS, samples=1)
    assert all(parameter.requires_grad for parameter in loaded.model.parameters())
    assert all(parameter.grad is None for parameter in loaded.model.parameters())
    with pytest.raises(ValueError, match="samples"):
        fisher_kl_profile(loaded, ids, RANKS, samples=0)


@pytest.mark.parametrize("mode, segment_len", [("separate", None), ("joint", 8)])
def test_delta_energy_is_each_units_output_change_alone(mode, segment_len):
    loaded = sharp_tiny_llama(torch.float64)
    shape = loaded.attention_shape
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    per_head = delta_energy_profile(loaded, ids, RANKS, mode, segment_len, per_head=True)
    per_layer = delta_energy_profile(loaded, ids, RANKS, mode, segment_len)
    assert per_head.shape == (2, shape.kv_heads, len(RANKS)) and per_layer.shape == (2, len(RANKS))
    # reference: one unit at one rank per forward, every other unit and layer full, energy summed by hand
    heads_per_group = shape.q_heads // shape.kv_heads
    for rank_index, rank in enumerate(RANKS):
        for group in range(shape.kv_heads):
            ranks = torch.full((1, shape.kv_heads), shape.head_dim)
            ranks[0, group] = rank
            energy = np.zeros(2)

            def handler(call: AttentionCall, ranks=ranks, energy=energy) -> torch.Tensor:
                delta = call.low_rank(ranks, mode)[0] - call.full()  # (B, Hq, m, d)
                energy[call.layer] += float(delta.pow(2).sum())
                return call.full()

            with install(loaded.model).use(handler, segment_len), torch.no_grad():
                loaded.model(input_ids=ids)
            reference = energy / ids.numel()
            assert per_head[:, group, rank_index] == pytest.approx(reference, rel=1e-9, abs=1e-20)
            if rank < shape.head_dim:
                assert reference[0] > 0 and heads_per_group == 2
    # a group's truncation changes only its own query heads, so the layer's energy is the groups' sum
    assert np.allclose(per_layer, per_head.sum(axis=1), rtol=1e-9)
    assert (per_head[..., -1] == 0).all()
