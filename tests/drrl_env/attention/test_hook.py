import pytest
import torch

from drrl_env.attention.hook import UnsupportedModelError, install
from drrl_env.attention.lowrank import full_attention
from drrl_env.lm.scoring import FixedRankHandler
from tests.conftest import tiny_llama

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))


def reference_logits(model):
    model.set_attn_implementation("eager")
    try:
        return model(input_ids=IDS).logits
    finally:
        if getattr(model, "_drrl_hook", None) is not None:
            model.set_attn_implementation("drrl")


def head_dim(model):
    config = model.config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def test_hook_without_handler_leaves_logits_unchanged(tiny_model):
    expected = reference_logits(tiny_model)
    install(tiny_model)
    assert torch.allclose(tiny_model(input_ids=IDS).logits, expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["separate", "joint"])
@pytest.mark.parametrize("segment_len", [None, 7])
def test_full_rank_through_the_hook_leaves_logits_unchanged(tiny_model, mode, segment_len):
    expected = reference_logits(tiny_model)
    hook = install(tiny_model)
    with hook.use(FixedRankHandler(head_dim(tiny_model), mode), segment_len):
        logits = tiny_model(input_ids=IDS).logits
    assert torch.allclose(logits, expected, atol=1e-4)


def test_handler_sees_every_layer_and_segment_with_post_rope_qkv(tiny_model):
    hook = install(tiny_model)
    seen = []

    def handler(call):
        seen.append((call.layer, call.segment, call.num_segments, call.query.shape[-2], call.key.shape[-2]))
        return full_attention(call.query, call.key, call.value, call.scale, call.mask)

    with hook.use(handler, segment_len=10):
        tiny_model(input_ids=IDS)
    layers = tiny_model.config.num_hidden_layers
    assert [(layer, seg) for layer, seg, *_ in seen] == [(layer, s) for layer in range(layers) for s in range(3)]
    assert [(m, n) for *_, m, n in seen[:3]] == [(10, 10), (10, 20), (4, 24)]


def test_low_rank_at_one_layer_changes_the_output():
    model = tiny_llama()
    hook = install(model)
    full = model(input_ids=IDS).logits

    def only_layer_one(call):
        return call.low_rank(1, "separate") if call.layer == 1 else call.full()

    with hook.use(only_layer_one):
        changed = model(input_ids=IDS).logits
    assert not torch.allclose(changed, full, atol=1e-4)


def test_handlers_are_per_thread(tiny_model):
    import threading

    hook = install(tiny_model)
    inside = []
    with hook.use(lambda call: inside.append(call.layer) or call.full()):
        thread = threading.Thread(target=lambda: tiny_model(input_ids=IDS))
        thread.start()
        thread.join()
        assert inside == []  # the other thread had no handler
        tiny_model(input_ids=IDS)
    assert len(inside) == tiny_model.config.num_hidden_layers


def test_padding_through_the_hook_matches_eager():
    model = tiny_llama()
    mask = torch.ones_like(IDS)
    mask[0, :5] = 0  # left padding
    model.set_attn_implementation("eager")
    expected = model(input_ids=IDS, attention_mask=mask).logits
    hook = install(model)
    with hook.use(FixedRankHandler(16, "joint")):
        logits = model(input_ids=IDS, attention_mask=mask).logits
    assert torch.allclose(logits[:, 5:], expected[:, 5:], atol=1e-4)


def test_unsupported_model_gets_a_clear_error():
    class Legacy(torch.nn.Module):
        _supports_attention_backend = False

        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "legacy-net", "num_hidden_layers": 1})()

    with pytest.raises(UnsupportedModelError, match="legacy-net"):
        install(Legacy())
