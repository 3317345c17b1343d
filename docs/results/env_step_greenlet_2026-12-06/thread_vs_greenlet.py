"""The hand-off of a paused forward pass: worker thread against greenlet (docs/benchmarks.md, 2026-12-06).

SmolLM2-135M, B = 2, n = 256; 8 interleaved rounds of: the plain forward, the same through a handler returning full
attention, a stepped forward in a worker thread (the caller computes each call's full attention), the same in a
greenlet (both written out here, as the runner before and after the change). Run from the repository root.
"""

import queue
import threading
import time

import greenlet
import torch

from drrl_env.attention.hook import install
from drrl_env.lm.models import load_causal_lm

model = load_causal_lm().model
hook = install(model)
ids = torch.randint(0, 40000, (2, 256), generator=torch.Generator().manual_seed(0))


def plain():
    with torch.no_grad():
        model(input_ids=ids, logits_to_keep=1)


def inline():
    with torch.no_grad(), hook.use(lambda call: call.full()):
        model(input_ids=ids, logits_to_keep=1)


def stepped_thread():
    calls, outputs = queue.Queue(maxsize=1), queue.Queue(maxsize=1)

    def handler(call):
        calls.put(call)
        return outputs.get()

    def run():
        with torch.no_grad(), hook.use(handler):
            model(input_ids=ids, logits_to_keep=1)
        calls.put(None)

    threading.Thread(target=run, daemon=True).start()
    call = calls.get()
    while call is not None:
        outputs.put(call.full())
        call = calls.get()


def stepped_greenlet():
    caller = greenlet.getcurrent()

    def run():
        with torch.no_grad(), hook.use(caller.switch):
            model(input_ids=ids, logits_to_keep=1)

    forward = greenlet.greenlet(run)
    call = forward.switch()
    while call is not None:
        call = forward.switch(call.full())


runs = {"plain": plain, "inline": inline, "thread": stepped_thread, "greenlet": stepped_greenlet}
times = {name: [] for name in runs}
for run in runs.values():
    run()
for _ in range(8):
    for name, run in runs.items():
        start = time.perf_counter()
        run()
        times[name].append(1e3 * (time.perf_counter() - start))
for name, values in times.items():
    values.sort()
    print(f"{name:10s} median {values[4]:7.1f} ms  min {values[0]:7.1f} ms")
