"""The decode-regime layer profile (generation.decode_profile) and the static allocation on it (static:decode)."""

import json

import numpy as np
import pytest
import torch

from drrl_env.attention.hook import install
from drrl_env.generation.decode import teacher_forced_logits
from drrl_env.generation.decode_profile import (
    decode_kl_profile,
    greedy_continuation,
    observed_attention_kls,
    prefill_logit_errors,
)
from drrl_env.lm.models import load_causal_lm
from drrl_env.lm.scoring import next_token_kl
from drrl_env.profiles import validation
from drrl_env.profiles.calibration import collect_grams
from oracle import static
from oracle.baselines import make_baseline
from tests.conftest import layer_mdp

PROMPT_LEN, TOKENS, RANKS = 90, 6, (4, 12, 16)


def cell_by_cell(loaded, prompts, basis, **options) -> np.ndarray:
    """The profile by its definition: one teacher-forced generation per prompt and cell, every other layer full."""
    layers, d = loaded.attention_shape.num_layers, loaded.attention_shape.head_dim
    cost = np.zeros((layers, len(RANKS)))
    for prompt in prompts:
        prompt = prompt[None]
        continuation = greedy_continuation(loaded, prompt, TOKENS)
        reference = teacher_forced_logits(loaded, prompt, continuation, "full")
        for layer in range(layers):
            for k, rank in enumerate(RANKS):
                spec = [rank if j == layer else d for j in range(layers)]
                low = teacher_forced_logits(loaded, prompt, continuation, spec, basis, **options)
                cost[layer, k] += next_token_kl(reference, low) / len(prompts)
    return cost


@pytest.mark.parametrize("basis", ["joint", "separate", "calibrated"])
def test_profile_equals_the_cell_by_cell_measurement(tiny_layered_model_dir, basis):
    loaded = load_causal_lm(tiny_layered_model_dir, device="cpu")  # sharp attention in layer 0
    prompts = torch.randint(0, 1000, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    options = {"recent_tokens": 8}  # the continuation reaches keys beyond its window
    if basis == "calibrated":
        options["calibration"] = collect_grams(loaded, torch.randint(0, 1000, (2, 64)))
    cost = decode_kl_profile(loaded, prompts, RANKS, TOKENS, basis, **options)
    assert cost.shape == (2, 3) and np.all(cost[:, -1] == 0)  # rank 16 = d costs nothing
    assert cost[0, 0] > cost[0, 1] > 0  # rank 4 costs more than 12 in the sharp layer
    np.testing.assert_allclose(cost, cell_by_cell(loaded, prompts, basis, **options), rtol=1e-5, atol=1e-9)


def test_profile_names_bad_arguments(tiny_layered_model_dir):
    loaded = load_causal_lm(tiny_layered_model_dir, device="cpu")
    with pytest.raises(ValueError, match="tokens"):
        decode_kl_profile(loaded, torch.zeros(1, 8, dtype=torch.long), RANKS, tokens=1)
    with pytest.raises(ValueError, match="prompts"):
        decode_kl_profile(loaded, torch.zeros(8, dtype=torch.long), RANKS)


@pytest.mark.expensive
def test_static_decode_allocates_from_the_profile_and_caches_it_on_disk(tiny_layered_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DRRL_CACHE_DIR", str(tmp_path))
    kwargs = layer_mdp(model=tiny_layered_model_dir, ranks=(4, 8, 12, 16), seq_len=64, batch_size=1)
    policy = make_baseline("static:0.5:decode", kwargs)
    assert policy.name == "static:0.5:decode" and policy.cost.shape == (2, 4)
    assert np.all(policy.cost[:, -1] == 0) and np.all(policy.cost[:, :-1] >= 0)
    chosen = [policy.ranks[k] for k in policy.allocation(0.5)]
    assert np.mean(chosen) <= 8 and chosen[0] >= chosen[1]  # the sharp layer gets at least the flat one's rank
    (stored,) = (tmp_path / "profiles").glob("*.json")
    assert json.loads(stored.read_text())["cost"] == policy.cost.tolist()
    static.validation_profile.cache_clear()

    def measure(*args):
        raise AssertionError("the profile should come from the disk cache")

    monkeypatch.setattr(validation, "measure_validation_profile", measure)
    again = make_baseline("static:0.5:decode", kwargs)
    np.testing.assert_array_equal(again.cost, policy.cost)
    with pytest.raises(ValueError, match="estimate"):
        static.StaticAllocation.profile(0.5, kwargs, estimate="guess")


@pytest.mark.parametrize("window", [7, None])
def test_prefill_logit_errors_equal_the_eckart_young_truncation_of_the_stacked_logits(tiny_layered_model_dir, window):
    loaded = load_causal_lm(tiny_layered_model_dir, device="cpu")
    shape = loaded.attention_shape
    prompt = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(2))
    captured = []

    def keep(call):
        captured.append((call.query[0].double(), call.key[0].double()))
        return call.full()

    with torch.no_grad(), install(loaded.model).use(keep):
        loaded.model(input_ids=prompt)
    errors = prefill_logit_errors(loaded, prompt, RANKS, window=window)
    assert errors.shape == (shape.num_layers, len(RANKS)) and np.all(errors[:, -1] == 0)
    groups = shape.q_heads // shape.kv_heads
    for layer, (query, key) in enumerate(captured):
        for k, rank in enumerate(RANKS[:-1]):
            error = total = 0.0
            for head in range(shape.kv_heads):
                stacked = query[head * groups : (head + 1) * groups]  # (G, n, d)
                logits = stacked.reshape(-1, shape.head_dim) @ key[head, 1:].T  # the sink (token 0) stays exact
                u, s, vh = torch.linalg.svd(logits, full_matrices=False)
                truncated = (u[:, :rank] * s[:rank]) @ vh[:rank]
                rows = (torch.arange(logits.shape[0]) % prompt.shape[1]) >= prompt.shape[1] - (
                    window or prompt.shape[1]
                )
                error += float(((logits - truncated)[rows] ** 2).sum())
                total += float((logits[rows] ** 2).sum())
            assert errors[layer, k] == pytest.approx(error / total, rel=1e-6, abs=1e-12)
    assert errors[0, 0] > errors[0, 1] > 0
    with pytest.raises(ValueError, match="window"):
        prefill_logit_errors(loaded, prompt, RANKS, window=0)


def test_key_energy_residuals_equal_the_singular_values_of_the_keys(tiny_layered_model_dir):
    from drrl_env.generation.decode_profile import key_energy_residuals

    loaded = load_causal_lm(tiny_layered_model_dir, device="cpu")
    shape = loaded.attention_shape
    prompt = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(3))
    captured = []

    def keep(call):
        captured.append(call.key[0].double())
        return call.full()

    with torch.no_grad(), install(loaded.model).use(keep):
        loaded.model(input_ids=prompt)
    residuals = key_energy_residuals(loaded, prompt, RANKS, sink_tokens=1)
    assert residuals.shape == (shape.num_layers, len(RANKS)) and np.all(residuals[:, -1] == 0)
    for layer, key in enumerate(captured):
        for k, rank in enumerate(RANKS[:-1]):
            shares = []
            for head in range(shape.kv_heads):
                energy = np.linalg.svd(key[head, 1:].numpy(), compute_uv=False) ** 2  # the sink (token 0) left out
                shares.append(1.0 - energy[:rank].sum() / energy.sum())
            assert residuals[layer, k] == pytest.approx(np.mean(shares), rel=1e-9, abs=1e-12)
    assert np.all(np.diff(residuals[:, :-1], axis=1) <= 1e-12)  # less energy left out at a larger rank


@pytest.mark.parametrize("recent", [0, 6])
def test_observed_attention_kls_equal_the_kl_of_the_eckart_young_truncated_logits(tiny_layered_model_dir, recent):
    """The joint basis's logits are the stacked logits' best rank-r approximation (sink out): the KL from that, per
    query and head, in loops, against the batched feature."""
    loaded = load_causal_lm(tiny_layered_model_dir, device="cpu")
    shape = loaded.attention_shape
    prefix = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(3))
    n, observed, queries = prefix.shape[1], 12, 4
    captured = []

    def keep(call):
        captured.append((call.query[0].double(), call.key[0].double(), call.scale))
        return call.full()

    with torch.no_grad(), install(loaded.model).use(keep):
        loaded.model(input_ids=prefix)
    kls = observed_attention_kls(loaded, prefix, RANKS, observed, recent_tokens=recent, queries=queries)
    assert kls.shape == (shape.num_layers, len(RANKS)) and np.all(kls[:, -1] == 0)
    positions = torch.linspace(n - observed, n - 1, queries).round().long().tolist()
    groups = shape.q_heads // shape.kv_heads
    for layer, (query, key, scale) in enumerate(captured):
        for k, rank in enumerate(RANKS[:-1]):
            values = []
            for head in range(shape.kv_heads):
                stacked = query[head * groups : (head + 1) * groups].reshape(-1, shape.head_dim)  # (G n, d)
                logits = stacked @ key[head, 1:].T
                u, s, vh = torch.linalg.svd(logits, full_matrices=False)
                truncated = (u[:, :rank] * s[:rank]) @ vh[:rank]
                for member in range(groups):
                    for p in positions:
                        row = member * n + p
                        exact = torch.cat([stacked[row] @ key[head, :1].T, logits[row]])[: p + 1] * scale
                        low = torch.cat([exact[:1] / scale, truncated[row][:p]]) * scale
                        window = slice(max(p + 1 - recent, 0), p + 1) if recent else slice(0, 0)
                        low[window] = exact[window]
                        log_p, log_q = torch.log_softmax(exact, -1), torch.log_softmax(low, -1)
                        values.append(float((log_p.exp() * (log_p - log_q)).sum()))
            assert kls[layer, k] == pytest.approx(np.mean(values), rel=1e-6, abs=1e-12)
    assert kls[0, 0] > kls[0, 1] > 0
    full_window = observed_attention_kls(loaded, prefix, RANKS, observed, recent_tokens=n, queries=queries)
    assert np.all(full_window == 0)  # every key exact: nothing moves
    with pytest.raises(ValueError, match="observed"):
        observed_attention_kls(loaded, prefix, RANKS, n)
