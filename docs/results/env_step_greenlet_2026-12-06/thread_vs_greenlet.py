import time
import torch, greenlet
from drrl_env.lm.models import load_causal_lm
from drrl_env.attention.hook import install
from drrl_env.lm.runner import SteppedForward
loaded = load_causal_lm(); model = loaded.model; hook = install(model)
torch.manual_seed(0); ids = torch.randint(0, 40000, (2, 256))
def plain():
    with torch.no_grad(): model(input_ids=ids, logits_to_keep=1)
def inline():
    with torch.no_grad(), hook.use(lambda c: c.full()): model(input_ids=ids, logits_to_keep=1)
def stepped():
    r = SteppedForward(model, hook, ids); call = r.start()
    while call is not None: call = r.send(call.full())
def stepped_gl():
    main = greenlet.getcurrent()
    def run():
        with torch.no_grad(), hook.use(lambda c: main.switch(c)): model(input_ids=ids, logits_to_keep=1)
    g = greenlet.greenlet(run); call = g.switch()
    while call is not None: call = g.switch(call.full())
fns = dict(plain=plain, inline=inline, stepped=stepped, greenlet=stepped_gl)
res = {k: [] for k in fns}
for f in fns.values(): f()
for _ in range(8):
    for k, f in fns.items():
        t = time.perf_counter(); f(); res[k].append(1e3 * (time.perf_counter() - t))
for k, v in res.items():
    v.sort(); print(f"{k:10s} median {v[4]:7.1f}  min {v[0]:7.1f}")
