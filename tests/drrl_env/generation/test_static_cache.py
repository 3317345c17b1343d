"""The low-rank key cache of fixed shapes and compiled decode steps (drrl_env.generation.static_cache).

Its logits against an explicit float64 reference:
``test_generate.test_decode_logits_equal_an_explicit_float64_reference`` (parametrised ``static``).
"""

import pytest
import torch

from drrl_env.attention.hook import ATTENTION_NAME, BOUND_LAYER, install
from drrl_env.generation.decode import compile_config, generate
from drrl_env.generation.kv_cache import cache_bytes
from drrl_env.generation.static_cache import StaticLowRankKeyCache, StaticLowRankKeyLayer, bind, bucket_widths
from tests.drrl_env.generation.test_generate import NEW_TOKENS, PROMPT_LEN, greedy, loaded_tiny, prompts


def logits(out) -> torch.Tensor:
    return torch.stack(out.logits, dim=1)


def test_widths_are_bucketed_and_full_rank_layers_keep_full_keys():
    ranks = torch.tensor([[5, 3], [64, 64], [17, 64], [32, 1], [17, 2]])
    assert bucket_widths(ranks, 64) == [16, None, 64, 32, 32]  # a layer is as wide as its widest head
    assert bucket_widths(ranks, 64, width_step=1) == [5, None, 64, 32, 17]
    assert bucket_widths(torch.tensor([[40, 2]]), 48, width_step=32) == [48]  # never wider than d
    with pytest.raises(ValueError, match="width_step must be >= 1"):
        bucket_widths(ranks, 64, width_step=0)
    for bad in (0, True, 2.5, None):
        with pytest.raises(ValueError, match="max_tokens must be a positive int"):
            StaticLowRankKeyCache([16], bad)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("ranks", ["full", 5, [16, 3, 9]])
def test_static_cache_gives_the_logits_of_the_growing_cache(name, ranks):
    loaded = loaded_tiny(name, torch.float64)
    grown = greedy(loaded, prompts(), ranks, recent_tokens=4)
    static = greedy(loaded, prompts(), ranks, recent_tokens=4, static=True)
    assert torch.equal(grown.sequences, static.sequences)
    torch.testing.assert_close(logits(static), logits(grown), rtol=1e-12, atol=1e-12)
    assert isinstance(static.cache, StaticLowRankKeyCache)


def test_a_prompt_shorter_than_the_recent_window_fills_the_ring_in_order():
    loaded = loaded_tiny("llama", torch.float64)
    ids = prompts(length=3)
    options = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    for window in (8, 5):  # 3 + 12 tokens: the ring of 8 is never full, the ring of 5 wraps around twice
        grown = generate(loaded, ids, 4, recent_tokens=window, **options)
        static = generate(loaded, ids, 4, recent_tokens=window, static=True, **options)
        torch.testing.assert_close(logits(static), logits(grown), rtol=1e-12, atol=1e-12)
    without = generate(loaded, ids, 4, recent_tokens=0, static=True, **options)
    assert (logits(without) - logits(static)).abs().max() > 1e-4  # the window really is exact (10^8 x tolerance)


def test_left_padded_batches_and_calibrated_bases_match_the_growing_cache(tiny_model_dir, monkeypatch, tmp_path):
    loaded = loaded_tiny("llama", torch.float64)
    padded, mask = prompts(), torch.ones(2, PROMPT_LEN, dtype=torch.long)
    padded[0, :5], mask[0, :5] = 0, 0
    grown = greedy(loaded, padded, [6, 16, 2], attention_mask=mask, sink_tokens=2)
    static = greedy(loaded, padded, [6, 16, 2], attention_mask=mask, sink_tokens=2, static=True)
    torch.testing.assert_close(logits(static), logits(grown), rtol=1e-12, atol=1e-12)
    from drrl_env.profiles.calibration import collect_grams

    grams = collect_grams(loaded, prompts(batch=4, length=32, seed=1), batch_size=2)
    grown = greedy(loaded, prompts(), [6, 16, 2], basis="calibrated", calibration=grams)
    static = greedy(loaded, prompts(), [6, 16, 2], basis="calibrated", calibration=grams, static=True)
    torch.testing.assert_close(logits(static), logits(grown), rtol=1e-12, atol=1e-12)


def test_storage_keeps_its_shape_and_address_and_holds_bucketed_keys():
    loaded = loaded_tiny("llama")
    out = greedy(loaded, prompts(), [4, 16, 9], recent_tokens=4, static=True)
    total = PROMPT_LEN + NEW_TOKENS
    layers = out.cache.layers
    assert [layer.keys.shape for layer in layers] == [(2, 2, total, 16)] * 3  # widths 4 and 9 bucketed to 16 = d
    assert [layer.width for layer in layers] == [16, None, 16]
    assert all(layer.values.shape == (2, 2, total, 16) for layer in layers)
    assert layers[0].recent.shape == (2, 2, 4, 16) and layers[1].recent is None
    # the ring holds the last 4 positions written (the last generated token is never fed back)
    assert sorted(layers[0].recent_positions.tolist()) == list(range(total - 5, total - 1))
    addresses = [layer.keys.data_ptr() for layer in layers]
    assert int(layers[0].get_seq_length()) == total - 1
    sizes = cache_bytes(out.cache)
    sink_and_recent = 2 * (2 * 2 * (1 + 4) * 16 * 4)
    assert sizes["keys"] == 3 * 2 * 2 * total * 16 * 4 + sink_and_recent
    assert [layer.keys.data_ptr() for layer in layers] == addresses


def test_beam_search_and_sampling_run_as_with_the_growing_cache():
    loaded = loaded_tiny("llama", torch.float64)
    options = dict(max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0, recent_tokens=3)
    grown = generate(loaded, prompts(), [5, 16, 9], **options)
    static = generate(loaded, prompts(), [5, 16, 9], static=True, **options)
    assert torch.equal(grown, static)
    sampled = []
    for static in (False, True):  # the same seed draws the same tokens from the same distributions
        torch.manual_seed(3)
        sampled.append(generate(loaded, prompts(), [5, 16, 9], static=static, max_new_tokens=8, do_sample=True,
                                top_k=20, pad_token_id=0))  # fmt: skip
    assert torch.equal(*sampled)


def test_a_reset_cache_generates_again_and_an_unbound_one_reads_through_the_handler():
    from drrl_env.generation.decode import cached_forward, key_cache_attention

    loaded = loaded_tiny("llama", torch.float64)
    ids, steps = prompts(), prompts(length=3, seed=5)

    def token_by_token(cache, handler):  # the prompt, then one token per forward, as decode steps run
        rows = [cached_forward(loaded, handler, cache, ids)[:, -1]]
        rows += [cached_forward(loaded, handler, cache, steps[:, i : i + 1])[:, -1] for i in range(3)]
        return torch.stack(rows, dim=1)

    options = dict(recent_tokens=2, max_tokens=PROMPT_LEN + 3)
    cache, handler = key_cache_attention(loaded, [5, 16, 9], "joint", static=True, **options)
    first = token_by_token(cache, handler)  # not bound: every call goes through the handler
    cache.reset()
    assert int(cache.layers[0].get_seq_length()) == 0 and not cache.layers[0].ready and cache.layers[1].ready
    again = token_by_token(cache, handler)
    grown = token_by_token(*key_cache_attention(loaded, [5, 16, 9], "joint", **options))
    assert torch.equal(first, again)
    torch.testing.assert_close(first, grown, rtol=1e-12, atol=1e-12)


def test_bind_needs_a_hooked_model_and_binds_one_cache_at_a_time():
    loaded = loaded_tiny("llama")
    with pytest.raises(RuntimeError, match="needs a hooked model"):
        with bind(loaded_tiny("gpt2").model, StaticLowRankKeyCache([16] * 3, 8)):
            pass
    install(loaded.model)
    cache = StaticLowRankKeyCache([16] * 3, 8)
    with bind(loaded.model, cache):
        with pytest.raises(RuntimeError, match="another static low-rank key cache is bound"):
            with bind(loaded.model, StaticLowRankKeyCache([16] * 3, 8)):
                pass
    attention = [module for module in loaded.model.modules() if hasattr(module, BOUND_LAYER)]
    assert len(attention) == 3 and all(getattr(module, BOUND_LAYER) is None for module in attention)


def test_a_static_layer_refuses_what_it_cannot_do():
    layer = StaticLowRankKeyLayer(max_tokens=8, width=4)
    with pytest.raises(RuntimeError, match="follows the prefill"):
        layer.compress(None, None)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        layer.crop(-1)
    with pytest.raises(NotImplementedError, match="contrastive search"):
        layer.batch_repeat_interleave(2)
    loaded = loaded_tiny("llama")
    out = greedy(loaded, prompts(), 4, static=True)
    layer = out.cache.layers[0]
    with pytest.raises(ValueError, match="one token per call after the prefill"):
        layer.update(torch.zeros(2, 2, 2, 16), torch.zeros(2, 2, 2, 16))
    with pytest.raises(ValueError, match="static key cache needs max_tokens"):
        from drrl_env.generation.decode import key_cache_attention

        key_cache_attention(loaded, 4, "joint", static=True)


@pytest.mark.expensive
def test_compiled_decode_is_one_graph_reused_across_rank_tables_of_the_same_buckets():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    loaded = loaded_tiny("llama")
    config = compile_config(loaded.device, fullgraph=True)  # a graph break would raise
    eager = [greedy(loaded, prompts(), ranks, recent_tokens=4, static=True) for ranks in ([16, 3, 9], [16, 5, 12])]
    compiled = [
        greedy(loaded, prompts(), ranks, recent_tokens=4, compiled=True, compile_config=config)
        for ranks in ([16, 3, 9], [16, 5, 12])
    ]
    assert counters["stats"]["unique_graphs"] == 1  # the second rank table (same buckets) reused the first's graph
    for fast, slow in zip(compiled, eager, strict=True):
        assert torch.equal(fast.sequences, slow.sequences)
        torch.testing.assert_close(logits(fast), logits(slow), rtol=1e-5, atol=1e-5)
    assert (logits(eager[0]) - logits(eager[1])).abs().max() > 1e-3  # the two rank tables differ
    # a hooked model attending through sdpa compiles without the hook's per-context lookup (fullgraph: no break)
    loaded.model.set_attn_implementation("sdpa")
    try:
        options = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, cache_implementation="static")
        loaded.model.generate(input_ids=prompts(), compile_config=config, **options)
    finally:
        loaded.model.set_attn_implementation(ATTENTION_NAME)


@pytest.mark.expensive
def test_generate_command_compiles_and_prints_what_eager_prints(tiny_model_dir, capsys, tmp_path, monkeypatch):
    from agents.generate import main

    monkeypatch.setenv("DRRL_CACHE_DIR", str(tmp_path))
    argv = ["--model", tiny_model_dir, "--policy", "fixed:8", "--prompt", "The river flows", "--max-new-tokens", "3"]
    argv += ["--ranks", "8", "16", "--device", "cpu"]
    assert main(argv) == 0
    eager = capsys.readouterr().out
    assert main(argv + ["--compile"]) == 0
    compiled = capsys.readouterr().out
    text = [line for line in compiled.splitlines() if line.startswith(("text:", "ranks per layer:"))]
    assert text and text == [line for line in eager.splitlines() if line.startswith(("text:", "ranks per layer:"))]
    assert "against full attention: KL" in compiled
