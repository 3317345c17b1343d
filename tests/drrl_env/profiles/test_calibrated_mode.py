"""The ``calibrated`` spectral mode (fixed group bases from calibration Grams) against explicit float64 logits."""

import dataclasses

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from drrl_env import ENV_ID
from drrl_env.attention.kv_basis import CalibrationGrams
from drrl_env.attention.lowrank import causal_mask, expand_kv_heads
from drrl_env.features import candidate_ner
from drrl_env.guardrail import transition_energies, truncation_errors
from tests.drrl_env.generation.test_generate import reference_logit_map
from tests.drrl_env.test_guardrail import random_call

HQ, HKV, D = 4, 2, 8


def calibrated_call(seed: int = 0):
    """A random call with a calibration from 60 explicit calibration positions, and those blocks."""
    generator = torch.Generator().manual_seed(100 + seed)
    spread = 0.7 ** torch.arange(D, dtype=torch.float64)
    queries = torch.randn(HKV, 2 * 60, D, generator=generator, dtype=torch.float64) * spread  # each group's 2 heads
    keys = torch.randn(HKV, 60, D, generator=generator, dtype=torch.float64) * spread
    grams = CalibrationGrams(
        (queries.transpose(-1, -2) @ queries).unsqueeze(0), (keys.transpose(-1, -2) @ keys).unsqueeze(0), {}
    )
    return dataclasses.replace(random_call(seed, hq=HQ, hkv=HKV, d=D), calibration=grams), queries, keys


def explicit_maps(queries, keys, rank):
    """``M (Hkv, d, d)``: the rank-``r`` Eckart-Young truncation of each group's calibration logits, as a map."""
    return torch.stack([reference_logit_map(queries[h], keys[h], rank, "joint") for h in range(HKV)])


def logit_norms(call, maps):
    """``||Q_h M_g K^T||_F`` per query head, ``(B, Hq)``."""
    groups = HQ // HKV
    per_head = expand_kv_heads(maps.unsqueeze(0), groups)  # (1, Hq, d, d)
    keys = expand_kv_heads(call.key, groups)
    return (call.query @ per_head @ keys.transpose(-1, -2)).square().sum(dim=(-1, -2)).sqrt()


@pytest.mark.parametrize("seed", [0, 1])
def test_calibrated_errors_and_outputs_equal_explicit_float64(seed):
    call, queries, keys = calibrated_call(seed)
    ranks = [1, 3, 5, 8]
    identity = torch.eye(D, dtype=torch.float64).expand(HKV, D, D)
    total = logit_norms(call, identity).square().view(-1, HKV, HQ // HKV).sum(dim=(0, 2))  # (Hkv,)

    def relative(maps):
        return (logit_norms(call, maps).square().view(-1, HKV, HQ // HKV).sum(dim=(0, 2)) / total).sqrt()

    errors = truncation_errors(call, torch.tensor(ranks), "calibrated").relative(per_group=True)
    expected = torch.stack([relative(identity - explicit_maps(queries, keys, r)) for r in ranks])
    torch.testing.assert_close(errors, expected, rtol=1e-8, atol=1e-10)
    assert errors[-1].abs().max() < 1e-7  # rank d: full attention
    ner = candidate_ner(call, torch.tensor(ranks), "calibrated", HKV)
    torch.testing.assert_close(ner, 1 - expected.square(), rtol=1e-8, atol=1e-10)

    moved = transition_energies(call, torch.tensor([5, 5]), torch.tensor([3, 8]), "calibrated").relative(True)
    base = explicit_maps(queries, keys, 5)
    expected_moves = torch.stack([relative(base - explicit_maps(queries, keys, 3)), relative(base - identity)])
    torch.testing.assert_close(moved, expected_moves, rtol=1e-8, atol=1e-10)

    table = torch.tensor([[3, 5], [8, 8]])
    outputs = call.low_rank(table, "calibrated")
    for row, output in zip(table.tolist(), outputs, strict=True):
        maps = torch.stack([explicit_maps(queries, keys, r)[h] for h, r in enumerate(row)])
        per_head = expand_kv_heads(maps.unsqueeze(0), HQ // HKV)
        scores = call.query @ per_head @ expand_kv_heads(call.key, HQ // HKV).transpose(-1, -2) * call.scale
        m, n = call.query.shape[-2], call.key.shape[-2]
        scores = scores.masked_fill(~causal_mask(m, n, "cpu"), float("-inf"))
        reference = torch.softmax(scores, dim=-1) @ expand_kv_heads(call.value, HQ // HKV)
        torch.testing.assert_close(output, reference, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(outputs[1], call.full(), rtol=1e-9, atol=1e-10)


def test_calibrated_mode_without_a_calibration_is_named():
    with pytest.raises(ValueError, match="needs the model's calibration"):
        random_call().low_rank(4, "calibrated")


def test_calibrated_env_passes_check_env_and_spends_nothing_on_spectra(tiny_env_kwargs, tmp_path, monkeypatch):
    monkeypatch.setenv("DRRL_CACHE_DIR", str(tmp_path))
    flops = {}
    for mode in ("joint", "calibrated"):
        env = gym.make(
            ENV_ID,
            **{**tiny_env_kwargs, "spectral_mode": mode, "flops_budget": None, "reward": "kl", "guardrail": "off"},
        )
        if mode == "calibrated":
            check_env(env.unwrapped)
            assert env.unwrapped.hook.calibration.source["split"] == "validation"  # never the test text
        obs, info = env.reset(seed=3)
        ner = obs[env.unwrapped.observation_slices["ner"]]
        assert np.isfinite(ner).all() and ner.max() <= 1.0
        done = False
        while not done:
            obs, reward, terminated, truncated, info = env.step(1)  # rank 8 of 16 in every layer
            done = terminated or truncated
        flops[mode] = (info["flops"], info["flops_logits"], info["kl"])
        env.close()
    assert flops["calibrated"][1] == flops["joint"][1]  # the same logit width ...
    assert flops["calibrated"][0] < flops["joint"][0]  # ... without per-input spectra
    assert flops["calibrated"][2] > 0
