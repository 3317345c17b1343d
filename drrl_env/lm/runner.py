"""Runs one LM forward pass layer by layer, pausing at every attention call for an agent.

The forward pass runs in a greenlet (a coroutine with its own stack, in the caller's thread) whose attention
handler hands each :class:`~drrl_env.attention.hook.AttentionCall` to the caller and waits for the output to
continue with. One thread runs both sides, one at a time, so results are deterministic, the hidden states stay
where the forward pass keeps them (each step costs one layer, not a whole forward), and torch's thread pools are
not split between two threads (a worker thread cost about 6 ms per step here: docs/benchmarks.md).

An episode is stepped in the thread that started it (greenlets do not cross threads).
"""

from __future__ import annotations

from collections.abc import Callable

import greenlet
import torch
from transformers import PreTrainedModel

from drrl_env.attention.hook import AttentionCall, AttentionHook


class SteppedForward:
    """A forward pass of ``model`` on ``input_ids`` that yields control at every attention call.

    Use: ``call = runner.start()``, then ``call = runner.send(output)`` until it returns None;
    ``runner.logits`` is then the model's ``(B, n, V)`` logits (when ``keep_logits``; otherwise only
    the last position's are computed and nothing is kept). The forward pass runs without autograd; the
    caller's grad mode is its own again whenever control comes back to it.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        hook: AttentionHook,
        input_ids: torch.Tensor,
        segment_len: int | None = None,
        keep_logits: bool = False,
    ) -> None:
        self._model, self._hook, self._ids = model, hook, input_ids
        self._segment_len, self._keep_logits = segment_len, keep_logits
        self._forward = greenlet.greenlet(self._run)
        self._caller: greenlet.greenlet | None = None
        self.logits: torch.Tensor | None = None

    def _handler(self, call: AttentionCall) -> torch.Tensor:
        output = self._caller.switch(call)
        torch.set_grad_enabled(False)  # the caller's grad mode is thread state: the forward's own again
        return output

    def _run(self) -> None:
        with torch.no_grad(), self._hook.use(self._handler, self._segment_len):
            if self._keep_logits:
                self.logits = self._model(input_ids=self._ids).logits
            else:
                self._model(input_ids=self._ids, logits_to_keep=1)

    def _resume(self, switch: Callable[[], AttentionCall | None]) -> AttentionCall | None:
        """Run ``switch`` (into the forward pass) until control comes back: the next attention call, or None at its end.

        The caller's grad mode is restored however the forward pass left it.
        """
        self._caller = greenlet.getcurrent()
        grad = torch.is_grad_enabled()
        try:
            return switch()
        except greenlet.error as error:
            raise RuntimeError(
                "a stepped forward pass (an episode) must be stepped in the thread that started it (reset)"
            ) from error
        finally:
            torch.set_grad_enabled(grad)

    def start(self) -> AttentionCall | None:
        """Start the forward pass; return its first attention call."""
        if self._forward or self._forward.dead:  # started (running or finished)
            raise RuntimeError("this forward pass has already started (a SteppedForward runs once)")
        return self._resume(self._forward.switch)

    def send(self, output: torch.Tensor) -> AttentionCall | None:
        """Continue the forward pass with ``output`` for the pending call; return the next call or None."""
        if not self._forward:
            raise RuntimeError("this forward pass is not waiting for an output (not started, or finished)")
        return self._resume(lambda: self._forward.switch(output))

    def abort(self) -> None:
        """Abandon a forward pass that is waiting for an output; idempotent."""
        if self._forward:
            self._resume(lambda: self._forward.throw(greenlet.GreenletExit))
