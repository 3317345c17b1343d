"""Generation with a low-rank key cache (drrl_env.generation.decode, kv_basis, kv_cache, calibration)."""

import pytest
import torch

from drrl_env.attention.hook import AttentionCall, install
from drrl_env.attention.kv_basis import basis_from_grams, group_grams
from drrl_env.attention.lowrank import causal_mask, expand_kv_heads
from drrl_env.generation.decode import generate, rank_table
from drrl_env.generation.kv_attention import KeyBasisAttention
from drrl_env.generation.kv_cache import cache_bytes
from drrl_env.lm.models import AttentionShape, LoadedModel, load_causal_lm
from drrl_env.profiles.calibration import calibration_grams, collect_grams
from tests.conftest import TINY_MODELS, tiny_llama

PROMPT_LEN, NEW_TOKENS = 24, 6


def loaded_tiny(name: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    return LoadedModel(name=f"tiny-{name}", model=TINY_MODELS[name]().to(dtype), tokenizer=None)


def prompts(batch: int = 2, length: int = PROMPT_LEN, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(loaded: LoadedModel, ids: torch.Tensor, ranks, basis: str = "joint", **kwargs):
    return generate(
        loaded,
        ids,
        ranks,
        basis=basis,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
        **kwargs,
    )


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_full_rank_generates_exactly_the_tokens_of_plain_generate(name):
    loaded = loaded_tiny(name)
    ids = prompts()
    plain = loaded.model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    for basis in ("separate", "joint"):
        cached = greedy(loaded, ids, "full", basis=basis)
        assert torch.equal(cached.sequences, plain)
        assert all(layer.keys.shape[-1] == 16 for layer in cached.cache.layers)


def test_full_rank_on_the_default_model_matches_plain_generate(default_model):
    ids = default_model.tokenizer("The history of the city begins", return_tensors="pt").input_ids
    plain = default_model.model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(generate(default_model, ids, "full", max_new_tokens=8, do_sample=False), plain)


def reference_logit_map(query: torch.Tensor, key: torch.Tensor, rank: int, basis: str) -> torch.Tensor:
    """``M (d, d)`` with ``q M k^T`` the rank-``r`` logits, from explicit float64 SVDs of one prompt's blocks.

    ``joint``: ``M = Q_s^+ (Q_s K^T)_r (K^T)^+`` for the group's stacked queries ``Q_s`` (the
    Eckart-Young truncation of the prompt's logits, read back as a map of ``q`` and ``k``);
    ``separate``: ``M = P_r P_r^T`` with ``P`` the keys' right singular vectors.
    """
    if basis == "separate":
        top = torch.linalg.svd(key, full_matrices=False).Vh[:rank].T
        return top @ top.T
    u, s, vh = torch.linalg.svd(query @ key.T, full_matrices=False)
    truncated = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    return torch.linalg.pinv(query) @ truncated @ torch.linalg.pinv(key.T)


class ExplicitLowRank:
    """Reference handler without a cache: logits ``q M k^T`` over the whole sequence, ``M`` from the prompt.

    The first ``sinks`` keys keep exact logits and are left out of the keys ``M`` is fitted to;
    a query at position ``p`` after the prompt scores keys ``p - window < j <= p`` exactly; with
    ``exact_prompt`` the prompt's own queries score every key exactly.
    """

    def __init__(
        self, ranks: torch.Tensor, basis: str, prompt_len: int, sinks: int, window: int = 0, exact_prompt: bool = False
    ) -> None:
        self.ranks, self.basis, self.prompt_len, self.sinks = ranks, basis, prompt_len, sinks
        self.window, self.exact_prompt = window, exact_prompt

    def __call__(self, call: AttentionCall) -> torch.Tensor:
        B, Hq, n, d = call.query.shape
        kv_heads = call.key.shape[1]
        groups = Hq // kv_heads
        if bool((self.ranks[call.layer] == d).all()):
            return call.full()
        maps = torch.empty(B, Hq, d, d, dtype=torch.float64)
        for b in range(B):
            for h in range(kv_heads):
                stacked = call.query[b, h * groups : (h + 1) * groups, : self.prompt_len].reshape(-1, d)
                rank = int(self.ranks[call.layer, h])
                fitted_keys = call.key[b, h, self.sinks : self.prompt_len]
                maps[b, h * groups : (h + 1) * groups] = reference_logit_map(stacked, fitted_keys, rank, self.basis)
        keys = expand_kv_heads(call.key, groups)
        scores, exact_scores = call.query @ maps @ keys.transpose(-1, -2), call.query @ keys.transpose(-1, -2)
        position = torch.arange(n)
        exact = (position.view(1, n) < self.sinks) | (position.view(1, n) > position.view(n, 1) - self.window)
        exact[: self.prompt_len] = self.exact_prompt | (position.view(1, n) < self.sinks)
        scores = torch.where(exact, exact_scores, scores)
        scores = (scores * call.scale).masked_fill(~causal_mask(n, n, "cpu"), float("-inf"))
        return torch.softmax(scores, dim=-1) @ expand_kv_heads(call.value, groups)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
@pytest.mark.parametrize("basis", ["joint", "separate"])
@pytest.mark.parametrize("sinks, window, exact_prefill", [(0, 0, False), (2, 0, False), (0, 3, False), (2, 3, True)])
@pytest.mark.parametrize("static", [False, True], ids=["stored", "static"])
def test_decode_logits_equal_an_explicit_float64_reference(name, basis, sinks, window, exact_prefill, static):
    loaded = loaded_tiny(name, torch.float64)
    shape = loaded.attention_shape
    per_head = [[5, 3], [16, 16], [8, 2]] if shape.kv_heads == 2 else [[5] * 4, [16] * 4, [3, 8, 2, 7]]
    ranks = rank_table(per_head, shape)
    ids = prompts()
    options = dict(sink_tokens=sinks, recent_tokens=window, exact_prefill=exact_prefill, static=static)
    out = greedy(loaded, ids, ranks, basis=basis, **options)
    hook = install(loaded.model)
    with hook.use(ExplicitLowRank(ranks, basis, PROMPT_LEN, sinks, window, exact_prefill)):
        reference = loaded.model(input_ids=out.sequences[:, :-1]).logits[:, PROMPT_LEN - 1 :]
    cached = torch.stack(out.logits, dim=1).double()  # generate hands logits over in float32
    assert cached.shape == reference.shape == (2, NEW_TOKENS, 128)
    torch.testing.assert_close(cached, reference, rtol=1e-6, atol=1e-6)
    plain = loaded.model(input_ids=out.sequences[:, :-1]).logits[:, PROMPT_LEN - 1 :]
    assert (cached - plain).abs().max() > 1e-4  # the low rank really changed the logits (100x the tolerance)


def test_the_cache_holds_width_r_keys_and_full_values():
    loaded = loaded_tiny("llama")
    out = greedy(loaded, prompts(), [4, 16, 9], recent_tokens=4)
    widths = [layer.keys.shape[-1] for layer in out.cache.layers]
    assert widths == [4, 16, 9]
    assert all(layer.values.shape[-1] == 16 for layer in out.cache.layers)
    length = PROMPT_LEN + NEW_TOKENS - 1
    sizes = cache_bytes(out.cache)
    sink_keys = 2 * 2 * 2 * 1 * 16 * 4  # two compressed layers keep one full-width sink key per sequence and head
    recent_keys = 2 * 2 * 2 * 4 * 16 * 4  # ... and the full-width keys of the last 4 positions
    assert all(layer.recent.shape[-2] == 4 for layer in out.cache.layers if layer.ready)
    assert sizes["keys"] == 2 * 2 * length * (4 + 16 + 9) * 4 + sink_keys + recent_keys
    assert sizes["values"] == 2 * 2 * length * 16 * 3 * 4


@pytest.mark.parametrize("ranks", ["full", [4, 16, 9]])
def test_preallocated_storage_gives_the_logits_and_bytes_of_concatenation_and_is_written_in_place(ranks):
    loaded = loaded_tiny("llama")
    stored = greedy(loaded, prompts(), ranks, recent_tokens=4)
    grown = greedy(loaded, prompts(), ranks, recent_tokens=4, preallocate=False)
    assert torch.equal(stored.sequences, grown.sequences)
    torch.testing.assert_close(torch.stack(stored.logits, 1), torch.stack(grown.logits, 1), rtol=0, atol=0)
    assert cache_bytes(stored.cache) == cache_bytes(grown.cache)
    for layer in stored.cache.layers:  # the keys and values are views of storage for prompt + new tokens
        for name, tensor in (("keys", layer.keys), ("values", layer.values)):
            storage = layer._storage[name]
            assert tensor.data_ptr() == storage.data_ptr() and storage.shape[-2] == PROMPT_LEN + NEW_TOKENS
    assert all(not layer._storage for layer in grown.cache.layers)


def test_storage_outgrown_or_reordered_keeps_every_token():
    from drrl_env.generation.kv_cache import LowRankKeyCache, LowRankKeyLayer

    layer = LowRankKeyLayer(max_tokens=4)
    chunks = [torch.randn(2, 1, n, 3, generator=torch.Generator().manual_seed(n)) for n in (3, 1, 2, 1)]
    for chunk in chunks:
        keys, values = layer.update(chunk, chunk + 1)
    expected = torch.cat(chunks, dim=-2)
    assert torch.equal(keys, expected) and torch.equal(values, expected + 1)  # 7 tokens past a storage of 4
    layer.batch_select_indices(torch.tensor([1]))  # a copy, no longer a view: the next write makes new storage
    keys, _ = layer.update(chunks[1][:1], chunks[1][:1])
    assert torch.equal(keys, torch.cat([expected[1:], chunks[1][:1]], dim=-2))
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="max_tokens must be a positive int"):
            LowRankKeyCache(2, bad)


def test_left_padded_rows_get_the_bases_of_their_own_tokens():
    loaded = loaded_tiny("llama", torch.float64)
    ids = prompts(batch=2)
    padded = ids.clone()
    padded[0, :5] = 0
    mask = torch.ones_like(padded)
    mask[0, :5] = 0
    batch = greedy(loaded, padded, 6, attention_mask=mask)
    alone = greedy(loaded, ids[:1, 5:], 6)
    torch.testing.assert_close(torch.stack(batch.logits, 1)[0], torch.stack(alone.logits, 1)[0], rtol=1e-6, atol=1e-6)


def test_sampling_and_beam_search_run_through_transformers():
    loaded = loaded_tiny("llama")
    sampled = generate(loaded, prompts(), 8, max_new_tokens=4, do_sample=True, top_k=5, pad_token_id=0)
    beams = generate(loaded, prompts(), 8, basis="separate", max_new_tokens=4, num_beams=3, pad_token_id=0)
    assert sampled.shape == beams.shape == (2, PROMPT_LEN + 4)


def test_grams_give_orthonormal_reproducible_calibrated_bases():
    loaded = loaded_tiny("llama")
    chunks = prompts(batch=6, length=32, seed=1)
    first, second = collect_grams(loaded, chunks, batch_size=4), collect_grams(loaded, chunks, batch_size=3)
    torch.testing.assert_close(first.key, second.key, rtol=1e-10, atol=0)
    ranks = rank_table([[6, 3], [16, 16], [1, 10]], loaded.attention_shape)
    for layer, basis in enumerate(first.bases(ranks)):
        for head, rank in enumerate(ranks[layer].tolist()):
            columns = basis.key_map[0, head, :, :rank]
            torch.testing.assert_close(columns.T @ columns, torch.eye(rank, dtype=torch.float64), atol=1e-10, rtol=0)
            assert not basis.key_map[0, head, :, rank:].any() and not basis.query_map[0, head, :, rank:].any()


def test_group_basis_keeps_the_logit_map_of_the_unnormalised_joint_maps():
    torch.manual_seed(0)
    query, key = torch.randn(1, 4, 40, 16, dtype=torch.float64), torch.randn(1, 2, 40, 16, dtype=torch.float64)
    gram_q, gram_k = group_grams(query, key)
    basis = basis_from_grams(gram_q, gram_k, torch.tensor([5, 7]), "joint")
    for head, rank in enumerate((5, 7)):
        stacked = query[0, 2 * head : 2 * head + 2].reshape(-1, 16)
        expected = reference_logit_map(stacked, key[0, head], rank, "joint")
        got = basis.query_map[0, head] @ basis.key_map[0, head].T
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8)


@pytest.mark.expensive
def test_calibrated_generation_uses_the_stored_grams(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("DRRL_CACHE_DIR", str(tmp_path))
    loaded = load_causal_lm(tiny_model_dir)
    grams = calibration_grams(loaded, tokens=256, seq_len=64)
    stored = list((tmp_path / "calibration").glob("*.safetensors"))
    assert len(stored) == 1
    again = calibration_grams(loaded, tokens=256, seq_len=64)
    assert torch.equal(grams.query, again.query) and torch.equal(grams.key, again.key)
    ids = loaded.tokenizer("A short prompt about the river", return_tensors="pt").input_ids
    out = generate(loaded, ids, 4, basis="calibrated", max_new_tokens=3, return_dict_in_generate=True)
    assert [layer.keys.shape[-1] for layer in out.cache.layers] == [4, 4]


def test_plain_forward_with_key_bases_equals_the_low_rank_prefill_of_generation():
    loaded = loaded_tiny("gpt2", torch.float64)
    ranks = rank_table(5, loaded.attention_shape)
    ids = prompts()
    hook = install(loaded.model)
    with hook.use(KeyBasisAttention(ranks, "joint")):
        forward = loaded.model(input_ids=ids).logits[:, -1]
    out = greedy(loaded, ids, ranks, exact_prefill=False)
    torch.testing.assert_close(out.logits[0].double(), forward, rtol=1e-6, atol=1e-6)
    exact = greedy(loaded, ids, ranks)  # the default prefill attends the prompt exactly
    torch.testing.assert_close(
        exact.logits[0].double(), loaded.model(input_ids=ids).logits[:, -1], rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize(
    "ranks, message",
    [
        ("half", "'full', an int"),
        ([4, 4], "one entry per layer"),
        ([[4, 4, 4]] * 3, "one entry per key/value head"),
        (0, r"\[1, head_dim=16\]"),
        (17, r"\[1, head_dim=16\]"),
    ],
)
def test_bad_ranks_are_named(ranks, message):
    with pytest.raises(ValueError, match=message):
        rank_table(ranks, AttentionShape(num_layers=3, q_heads=4, kv_heads=2, head_dim=16))


def test_generate_refuses_a_cache_of_its_own_and_unknown_bases():
    loaded = LoadedModel(name="tiny", model=tiny_llama(), tokenizer=None)
    with pytest.raises(ValueError, match="do not pass cache="):
        generate(loaded, prompts(), 4, cache=None)
    with pytest.raises(ValueError, match="basis must be one of"):
        generate(loaded, prompts(), 4, basis="pca")


def test_teacher_forced_logits_are_the_decode_steps_logits():
    from drrl_env.generation.decode import teacher_forced_logits

    loaded = loaded_tiny("llama", torch.float64)
    ids = prompts()
    for basis, window in (("joint", 3), ("separate", 0)):
        out = greedy(loaded, ids, [5, 16, 3], basis=basis, recent_tokens=window)
        forced = teacher_forced_logits(
            loaded, ids, out.sequences[:, PROMPT_LEN:], [5, 16, 3], basis, recent_tokens=window
        )
        torch.testing.assert_close(forced.float(), torch.stack(out.logits, dim=1), rtol=1e-6, atol=1e-6)


def test_generate_command_runs_a_policy_over_the_prompt(tiny_model_dir, capsys, tmp_path, monkeypatch):
    from agents.generate import main

    monkeypatch.setenv("DRRL_CACHE_DIR", str(tmp_path))

    argv = ["--model", tiny_model_dir, "--policy", "fixed:8", "--prompt", "The river flows", "--max-new-tokens", "3"]
    assert main(argv + ["--ranks", "8", "16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "ranks per layer: 8/8 8/8" in out and "against full attention: KL" in out
    assert main(argv + ["--policy", "energy:0.9", "--basis", "separate", "--no-compare", "--ranks", "8", "16"]) == 0
    assert "KV cache" in capsys.readouterr().out
    given = ["--policy", "layers:16,8", "--no-compare", "--ranks", "8", "16", "--flops-budget", "0.75"]
    assert main(argv + given) == 0  # one given rank per layer (experiments/key_cache_profile.py's allocation)
    assert "ranks per layer: 16/16 8/8" in capsys.readouterr().out
    assert main(argv + ["--policy", "layers:8", "--no-compare", "--ranks", "8", "16"]) == 2
    assert "layers: got 1 ranks for a model of 2 layers" in capsys.readouterr().err
    calibrated = [
        "--basis",
        "calibrated",
        "--calibration-len",
        "16",
        "--calibration-tokens",
        "64",
        "--recent-tokens",
        "2",
    ]
    assert main(argv + calibrated + ["--ranks", "8", "16"]) == 0
    assert "against full attention: KL" in capsys.readouterr().out
    assert len(list((tmp_path / "calibration").glob("*.safetensors"))) == 1  # fitted on 16-token chunks, stored


def test_generate_command_names_bad_arguments(tiny_model_dir, capsys):
    from agents.generate import main

    assert main(["--model", tiny_model_dir, "--policy", "nonsense:3", "--prompt", "x", "--device", "cpu"]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["--model", tiny_model_dir, "--prompt", "x y z", "--device", "cpu"]) == 2  # default ranks exceed d = 16
    assert "head_dim (16)" in capsys.readouterr().err


def test_env_reset_runs_on_given_tokens(tiny_env_kwargs):
    import gymnasium as gym

    from drrl_env import ENV_ID

    env = gym.make(ENV_ID, **{**tiny_env_kwargs, "batch_size": 1, "seq_len": 12}).unwrapped
    ids = torch.arange(3, 15).unsqueeze(0)
    env.reset(seed=0, options={"input_ids": ids})
    assert torch.equal(env.input_ids.cpu(), ids)
    with pytest.raises(ValueError, match=r"input_ids must have shape \(1, 12\)"):
        env.reset(options={"input_ids": ids[:, :5]})
    env.close()


@pytest.mark.expensive
def test_perplexity_command_adds_key_bases(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from agents import perplexity

    monkeypatch.setenv("DRRL_CACHE_DIR", str(tmp_path))
    argv = ["--model", tiny_model_dir, "--seq-len", "32", "--max-tokens", "128", "--ranks", "8"]
    argv += ["--modes", "joint", "calibrated", "--key-bases", "joint", "calibrated", "--device", "cpu"]
    assert perplexity.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any("key:joint" in line for line in lines) and any("key:calibrated" in line for line in lines)
    assert any(line.split()[1:2] == ["calibrated"] for line in lines)  # the env's calibrated spectral mode


@pytest.mark.parametrize("ranks", [8.5, True, float("nan"), [8.7, 8]])
def test_ranks_that_are_not_whole_numbers_are_refused_not_truncated(ranks):
    from drrl_env.generation.decode import rank_table
    from drrl_env.lm.models import AttentionShape

    shape = AttentionShape(num_layers=2, q_heads=4, kv_heads=2, head_dim=16)
    with pytest.raises(ValueError, match="whole numbers"):
        rank_table(ranks, shape)
