"""Runs one LM forward pass layer by layer, pausing at every attention call for an agent.

The forward pass runs in a worker thread whose attention handler hands each
:class:`~drrl_env.attention.hook.AttentionCall` to the caller and waits for the output to continue with.
Exactly one of the two threads runs at a time, so results are deterministic, and the hidden
states stay where the forward pass keeps them: each step costs one layer, not a whole forward.
"""

from __future__ import annotations

import queue
import threading

import torch
from transformers import PreTrainedModel

from drrl_env.attention.hook import AttentionCall, AttentionHook


class _Abort(Exception):
    """Raised inside the worker to unwind an abandoned forward pass."""


_ABORT = object()
_FINISHED = object()


class SteppedForward:
    """A forward pass of ``model`` on ``input_ids`` that yields control at every attention call.

    Use: ``call = runner.start()``, then ``call = runner.send(output)`` until it returns None;
    ``runner.logits`` is then the model's ``(B, n, V)`` logits (when ``keep_logits``; otherwise only
    the last position's are computed and nothing is kept).
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
        self._calls: queue.Queue = queue.Queue(maxsize=1)
        self._outputs: queue.Queue = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._run, name="drrl-forward", daemon=True)
        self.logits: torch.Tensor | None = None

    def _handler(self, call: AttentionCall) -> torch.Tensor:
        self._calls.put(call)
        output = self._outputs.get()
        if output is _ABORT:
            raise _Abort
        return output

    def _run(self) -> None:
        try:
            with torch.no_grad(), self._hook.use(self._handler, self._segment_len):
                if self._keep_logits:
                    self.logits = self._model(input_ids=self._ids).logits
                else:
                    self._model(input_ids=self._ids, logits_to_keep=1)
            self._calls.put(_FINISHED)
        except _Abort:
            pass
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            self._calls.put(error)

    def _next(self) -> AttentionCall | None:
        item = self._calls.get()
        if isinstance(item, BaseException):
            raise item
        return None if item is _FINISHED else item

    def start(self) -> AttentionCall | None:
        """Start the forward pass; return its first attention call."""
        self._thread.start()
        return self._next()

    def send(self, output: torch.Tensor) -> AttentionCall | None:
        """Continue the forward pass with ``output`` for the pending call; return the next call or None."""
        self._outputs.put(output)
        return self._next()

    def abort(self) -> None:
        """Abandon a forward pass that is waiting for an output; idempotent."""
        if self._thread.is_alive():
            self._outputs.put(_ABORT)
            self._thread.join()
