import gymnasium as gym
import numpy as np
import pytest
import torch

import drrl_env  # noqa: F401 - registers DRRL-Attention-v0
from drrl_env.attention.hook import install
from drrl_env.lm.models import LoadedModel, load_causal_lm
from drrl_env.lm.scoring import LayerRanksHandler, lm_loss, next_token_kl, replay_scores
from drrl_env.profiles.kl import decoder_layers, layer_kl_profile, unit_kl_profile
from drrl_env.profiles.sensitivity import fisher_kl_profile
from drrl_env.profiles.waterfill import allocate_ranks
from oracle.baselines import UniformBudget, make_baseline
from oracle.hindsight import HindsightOracle
from oracle.static import StaticAllocation
from tests.conftest import layer_mdp

RANKS = (2, 4, 8, 12, 16)


@pytest.mark.parametrize("mode, segment_len", [("separate", None), ("joint", 8)])
def test_profile_equals_one_forward_per_cell(tiny_layered_model_dir, mode, segment_len):
    loaded = load_causal_lm(tiny_layered_model_dir, device="cpu")
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    profile = layer_kl_profile(loaded, ids, RANKS, mode, segment_len)
    hook = install(loaded.model)
    with torch.no_grad(), hook.use(None, segment_len):
        full = loaded.model(input_ids=ids).logits
    for layer in range(2):
        for k, rank in enumerate(RANKS):
            ranks = [None, None]
            ranks[layer] = rank
            with torch.no_grad(), hook.use(LayerRanksHandler(tuple(ranks), mode), segment_len):
                expected = next_token_kl(full, loaded.model(input_ids=ids).logits)
            assert profile[layer, k] == pytest.approx(expected, rel=1e-4, abs=1e-7), (layer, rank)
    assert (profile[:, -1] == 0).all() and (profile >= 0).all()
    assert (profile[:, 0] > 0).all()  # rank 2 of 16 costs something in every layer


@pytest.mark.parametrize("per_head, per_segment", [(True, False), (False, True), (True, True)])
def test_unit_profile_equals_one_forward_per_cell(tiny_layered_model_dir, per_head, per_segment):
    loaded = load_causal_lm(tiny_layered_model_dir, device="cpu")
    shape, segment_len = loaded.attention_shape, 12  # 32 tokens: segments of 12, 12 and 8 queries
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    profile = unit_kl_profile(loaded, ids, RANKS, "joint", segment_len, per_head, per_segment)
    heads, segments = (shape.kv_heads if per_head else 1), (3 if per_segment else 1)
    assert profile.shape == (shape.num_layers, segments * heads, len(RANKS))
    hook = install(loaded.model)
    with torch.no_grad(), hook.use(None, segment_len):
        full = loaded.model(input_ids=ids).logits
    for layer in range(shape.num_layers):
        for unit in range(segments * heads):
            segment, head = divmod(unit, heads)
            for k in (0, 2):

                def one_cell(call, layer=layer, segment=segment, head=head, rank=RANKS[k]):
                    if call.layer != layer or (per_segment and call.segment != segment):
                        return call.full()
                    ranks = torch.full((shape.kv_heads,), rank)
                    if per_head:
                        ranks = torch.full((shape.kv_heads,), shape.head_dim).index_fill(0, torch.tensor([head]), rank)
                    return call.low_rank(ranks, "joint")

                with torch.no_grad(), hook.use(one_cell, segment_len):
                    expected = next_token_kl(full, loaded.model(input_ids=ids).logits)
                assert profile[layer, unit, k] == pytest.approx(expected, rel=1e-4, abs=1e-7), (layer, unit, k)
    assert (profile[..., -1] == 0).all() and (profile[0, :, 0] > 0).all()
    with pytest.raises(ValueError, match="segment_len"):
        unit_kl_profile(loaded, ids, RANKS, "joint", None, per_segment=True)


def test_allocation_weights_count_unequal_units():
    cost = np.array([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])  # two units with equal costs
    flops = np.array([0.25, 0.5, 1.0])
    assert allocate_ranks(cost, flops, 0.75) == [1, 2] or allocate_ranks(cost, flops, 0.75) == [2, 1]
    heavy_last = allocate_ranks(cost, flops, 0.75, weights=np.array([0.5, 1.5]))  # the second unit costs 3x the first
    assert heavy_last == [2, 1] and np.mean(np.array([0.5, 1.5]) * flops[heavy_last]) <= 0.75
    with pytest.raises(ValueError, match="weights"):
        allocate_ranks(cost, flops, 0.75, weights=np.ones(3))


def test_prefix_reuse_on_llama_and_gpt2(tiny_model):
    """The layers before l are skipped (their recorded output handed on): same profile as full forwards."""
    loaded = LoadedModel("tiny", tiny_model, tokenizer=None)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    ranks = (2, 8, 16)
    profile = layer_kl_profile(loaded, ids, ranks, "separate")
    assert decoder_layers(tiny_model, loaded.attention_shape.num_layers) is not None
    hook = install(tiny_model)
    with torch.no_grad(), hook.use(None):
        full = tiny_model(input_ids=ids).logits
    for layer in range(loaded.attention_shape.num_layers):
        for k, rank in enumerate(ranks[:-1]):
            layer_ranks = [None] * loaded.attention_shape.num_layers
            layer_ranks[layer] = rank
            with torch.no_grad(), hook.use(LayerRanksHandler(tuple(layer_ranks), "separate")):
                expected = next_token_kl(full, tiny_model(input_ids=ids).logits)
            assert profile[layer, k] == pytest.approx(expected, rel=1e-4, abs=1e-7), (layer, rank)
    assert not any("forward" in vars(layer) for layer in decoder_layers(tiny_model, 3))  # patches undone


@pytest.mark.expensive
def test_hindsight_spends_the_episode_budget_on_its_own_profile(tiny_layered_model_dir, monkeypatch):
    kwargs = layer_mdp(model=tiny_layered_model_dir, ranks=RANKS, seq_len=32, segment_len=8, batch_size=2)
    kwargs.update(flops_budget=(0.4, 0.8), device="cpu", guardrail="off")  # the guardrail would move ranks
    env = gym.make("DRRL-Attention-v0", **kwargs).unwrapped
    kls = {}
    policies = (
        HindsightOracle(),
        HindsightOracle("fisher"),
        UniformBudget(),
        StaticAllocation.profile(None, kwargs, max_tokens=256),
        StaticAllocation.profile(None, kwargs, max_tokens=256, estimate="fisher"),
    )
    for policy in policies:
        observation, info = env.reset(seed=3)
        policy.reset(3)
        terminated, ranks = False, []
        while not terminated:
            action = policy.act(observation, env.action_masks(), env)
            observation, _, terminated, _, info = env.step(action)
            ranks.append(info["rank"])
        assert info["budget_used"] <= info["budget"] + 1e-9
        kls[policy.name] = info["kl"]
        if policy.name.startswith("hindsight"):
            flops = np.asarray(RANKS) / 16
            expected = [RANKS[k] for k in allocate_ranks(policy.last_profile, flops, info["budget"])]
            assert ranks == [rank for rank in expected for _ in range(4)]  # every segment of a layer
    assert set(kls) == {"hindsight", "hindsight:fisher", "uniform", "static", "static:fisher"}
    assert all(np.isfinite(list(kls.values())))
    profiled = []  # the spec's budget and estimate reach the profile (profiling itself is covered above)
    monkeypatch.setattr(StaticAllocation, "profile", classmethod(lambda cls, *args, **kw: profiled.append((args, kw))))
    make_baseline("static:0.5:fisher", kwargs)
    assert profiled[0][0][0] == 0.5 and profiled[0][1]["estimate"] == "fisher"
    with pytest.raises(ValueError, match="bad parameter in policy spec 'hindsight:fast'"):
        make_baseline("hindsight:fast", kwargs)


def test_static_profiles_at_least_one_sequence(tiny_layered_model_dir):
    """A sequence longer than the profiled tokens (generation at long contexts) still gets a profile."""
    kwargs = layer_mdp(
        model=tiny_layered_model_dir, ranks=RANKS, seq_len=64, batch_size=1, device="cpu", guardrail="off"
    )
    static = StaticAllocation.profile(0.5, kwargs, max_tokens=16, progress=False)
    assert np.isfinite(static.cost).all() and (static.cost[:, 0] > 0).all()


def test_hindsight_per_head_plays_its_unit_allocation(tiny_layered_model_dir):
    kwargs = layer_mdp(model=tiny_layered_model_dir, ranks=RANKS, seq_len=32, batch_size=2, per_head=True)
    env = gym.make(
        "DRRL-Attention-v0", **{**kwargs, "flops_budget": 0.5, "device": "cpu", "guardrail": "off"}
    ).unwrapped
    policy = HindsightOracle()
    observation, _ = env.reset(seed=3)
    policy.reset(3)
    terminated, played = False, []
    while not terminated:
        action = policy.act(observation, env.action_masks(), env)
        assert action.shape == (env.kv_heads,)
        observation, _, terminated, _, info = env.step(action)
        played.append(list(info["rank"]))
    assert policy.last_profile.shape == (env.num_layers, env.kv_heads, len(RANKS))
    chosen = allocate_ranks(policy.last_profile.reshape(-1, len(RANKS)), np.asarray(RANKS) / 16, 0.5)
    assert played == np.asarray(RANKS)[np.asarray(chosen)].reshape(env.num_layers, env.kv_heads).tolist()
    assert info["budget_used"] <= 0.5 + 1e-9 and len({rank for ranks in played for rank in ranks}) > 1
    env.reset(seed=4)
    fisher = HindsightOracle("fisher")
    allocation = fisher.allocate(env)
    assert fisher.last_profile.shape == (env.num_layers, env.kv_heads, len(RANKS))
    assert np.asarray(allocation).shape == (env.num_layers, env.kv_heads)


def test_hindsight_fisher_reuses_the_per_head_env_profile(tiny_layered_model_dir):
    kwargs = layer_mdp(model=tiny_layered_model_dir, ranks=RANKS, seq_len=32, batch_size=2, per_head=True)
    env = gym.make(
        "DRRL-Attention-v0",
        **{**kwargs, "flops_budget": 0.5, "device": "cpu", "guardrail": "off", "sensitivity_samples": 2},
    ).unwrapped
    observation, _ = env.reset(seed=3)
    assert env.sensitivity_profile.shape == (env.num_layers, env.kv_heads, len(RANKS))
    policy = HindsightOracle("fisher", samples=2)
    policy.act(observation, env.action_masks(), env)
    assert policy.last_profile is env.sensitivity_profile


def test_replay_scores_are_the_kl_and_loss_of_a_layer_ranks_forward(tiny_layered_model_dir):
    loaded = load_causal_lm(tiny_layered_model_dir, device="cpu")
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(5))
    hook = install(loaded.model)
    with torch.no_grad(), hook.use(None, 8):
        full = loaded.model(input_ids=ids).logits
    spec = ((2, 4, 8, 16), torch.tensor([4, 16]))  # layer 0 per segment, layer 1 per key/value group
    with torch.no_grad(), hook.use(LayerRanksHandler(spec, "joint"), 8):
        logits = loaded.model(input_ids=ids).logits
    kl, loss = replay_scores(loaded, ids, spec, "joint", full, segment_len=8)
    assert kl == pytest.approx(next_token_kl(full, logits), rel=1e-6) and kl > 0
    assert loss == pytest.approx(lm_loss(logits, ids), rel=1e-6)
    assert replay_scores(loaded, ids, [None, None], "joint", full, segment_len=8)[0] == pytest.approx(0, abs=1e-7)


def test_hindsight_fisher_sample_count_in_the_spec(tiny_layered_model_dir):
    kwargs = layer_mdp(
        model=tiny_layered_model_dir, ranks=RANKS, seq_len=32, batch_size=2, device="cpu", guardrail="off"
    )
    policy = make_baseline("hindsight:fisher:3", kwargs)
    assert policy.name == "hindsight:fisher:3" and make_baseline("hindsight:fisher").name == "hindsight:fisher"
    env = gym.make("DRRL-Attention-v0", **{**kwargs, "flops_budget": 0.5, "sensitivity_samples": 3}).unwrapped
    observation, _ = env.reset(seed=1)
    policy.act(observation, env.action_masks(), env)
    assert policy.last_profile is env.sensitivity_profile  # the env's 3-sample estimate, reused
    plain = gym.make("DRRL-Attention-v0", **{**kwargs, "flops_budget": 0.5}).unwrapped
    plain.reset(seed=1)
    policy.allocate(plain)
    expected = fisher_kl_profile(plain.loaded, plain.input_ids, RANKS, "separate", samples=3)
    np.testing.assert_array_equal(policy.last_profile, expected)
    for bad in ("hindsight:exact:3", "hindsight:fisher:0", "hindsight:fisher:x"):
        with pytest.raises(ValueError, match="bad parameter in policy spec"):
            make_baseline(bad, kwargs)
