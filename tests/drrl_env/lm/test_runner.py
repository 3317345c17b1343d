"""The stepped forward pass (a greenlet): the same logits as the plain model, the caller's grad mode and hook state
kept, two passes interleaved in one thread, abort, errors."""

import threading

import pytest
import torch

from drrl_env.attention.hook import install
from drrl_env.lm.runner import SteppedForward
from tests.conftest import tiny_llama

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))


def stepped_logits(runner, handler=lambda call: call.full()):
    call, layers = runner.start(), []
    while call is not None:
        layers.append(call.layer)
        call = runner.send(handler(call))
    return runner.logits, layers


def test_stepped_logits_equal_the_plain_forward_and_each_layer_pauses_once():
    model = tiny_llama()
    hook = install(model)
    expected = model(input_ids=IDS).logits
    runner = SteppedForward(model, hook, IDS, keep_logits=True)
    logits, layers = stepped_logits(runner)
    assert layers == list(range(model.config.num_hidden_layers))
    assert torch.equal(logits, expected)
    with pytest.raises(RuntimeError, match="already started"):  # finished: it does not run again
        runner.start()


def test_the_callers_grad_mode_is_its_own_and_the_forward_runs_without_autograd():
    model = tiny_llama().requires_grad_(True)
    hook = install(model)
    runner = SteppedForward(model, hook, IDS, keep_logits=True)
    seen = []

    def handler(call):
        seen.append(torch.is_grad_enabled())  # the caller's side: grad enabled
        return call.full()

    with torch.enable_grad():
        logits, _ = stepped_logits(runner, handler)
        assert torch.is_grad_enabled()
    assert seen and all(seen)
    assert logits.grad_fn is None and not logits.requires_grad


def test_two_passes_interleaved_in_one_thread_route_their_own_handlers():
    model = tiny_llama()
    hook = install(model)
    expected_full = model(input_ids=IDS).logits
    full = SteppedForward(model, hook, IDS, keep_logits=True)
    low = SteppedForward(model, hook, IDS, segment_len=7, keep_logits=True)
    full_call, low_call, segments = full.start(), low.start(), set()
    while full_call is not None or low_call is not None:
        if full_call is not None:
            full_call = full.send(full_call.full())
        if low_call is not None:
            segments.add(low_call.segment)
            low_call = low.send(low_call.low_rank(2, "separate"))
    assert torch.equal(full.logits, expected_full)
    assert segments == {0, 1, 2, 3}  # 24 queries in segments of 7
    assert not torch.allclose(low.logits, expected_full, atol=1e-3)
    assert hook.handler is None  # the caller's context routes nothing


def test_abort_unwinds_the_pass_and_a_new_one_runs():
    model = tiny_llama()
    hook = install(model)
    runner = SteppedForward(model, hook, IDS)
    call = runner.start()
    assert call.layer == 0
    with pytest.raises(RuntimeError, match="already started"):
        runner.start()
    runner.abort()
    runner.abort()  # idempotent
    with pytest.raises(RuntimeError, match="not waiting"):
        runner.send(call.full())
    logits, _ = stepped_logits(SteppedForward(model, hook, IDS, keep_logits=True))
    assert torch.equal(logits, model(input_ids=IDS).logits)


def test_an_error_in_the_forward_reaches_the_caller():
    model = tiny_llama()
    hook = install(model)
    runner = SteppedForward(model, hook, IDS)
    runner.start()
    with pytest.raises(RuntimeError):  # a wrong-shaped output breaks the layer's o_proj
        runner.send(torch.zeros(1, 1, 1, 3))
    assert hook.handler is None


def test_stepping_from_another_thread_is_a_clear_error():
    model = tiny_llama()
    runner = SteppedForward(model, install(model), IDS)
    call = runner.start()
    errors = []
    thread = threading.Thread(target=lambda: _send(runner, call, errors))
    thread.start()
    thread.join()
    assert errors and "thread that started it" in str(errors[0])
    runner.abort()


def _send(runner, call, errors):
    try:
        runner.send(call.full())
    except RuntimeError as error:
        errors.append(error)
