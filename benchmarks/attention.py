"""Full vs low-rank attention on SmolLM2's layer shape, measured side by side in one run.

Prints one table: for n in {256, 1024, 4096} and r in {16, 32, 48, 64}, both spectral modes,
the wall-clock ratio low-rank / full (SDPA) for the default path (zero-padded to width d, fused
SDPA) and for the width-r reference path (``fused=False``), the FLOPs ratio (core and with overheads, from
``drrl_env.attention.flops``) and the share of the low-rank time spent on the spectra. A second table
compares spectrum methods (Gram + eigh, ``torch.linalg.svd``, ``torch.svd_lowrank``), and a third the places the
float64 ``eigh`` of a batch of ``64 x 64`` Grams can run (``drrl_env.attention.spectra.EIGH_SOLVERS``: ``device``,
one cuSOLVER launch per matrix on CUDA; ``host``, one copy each way and LAPACK on the CPU).

    python benchmarks/attention.py [--device cpu|cuda] [--lengths 256 1024 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from drrl_env.attention import spectra
from drrl_env.attention.flops import full_attention_flops, low_rank_attention_flops
from drrl_env.attention.lowrank import full_attention, low_rank_attention
from drrl_env.attention.spectra import block_spectrum

HQ, HKV, D = 9, 3, 64  # SmolLM2-135M


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096], help="sequence lengths n")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 48, 64], help="ranks r")
    parser.add_argument("--batch", type=int, default=1, help="batch size B")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per cell (median)")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"device: {name}; torch {torch.__version__}; B={args.batch} Hq={HQ} Hkv={HKV} d={D}; median of {args.repeats}"
    )
    print()
    print(
        f"{'n':>5} {'mode':<9} {'r':>3} {'full ms':>9} {'low ms':>9} {'wall ratio':>10} {'width-r ms':>10} "
        f"{'ratio':>6} {'FLOPs core':>10} {'FLOPs total':>11} {'spectra share':>13}"
    )
    generator = torch.Generator(device=device).manual_seed(0)
    for n in args.lengths:
        q = torch.randn(args.batch, HQ, n, D, device=device, generator=generator)
        k = torch.randn(args.batch, HKV, n, D, device=device, generator=generator)
        v = torch.randn(args.batch, HKV, n, D, device=device, generator=generator)
        full_ms = 1e3 * timed(lambda: full_attention(q, k, v), device, args.repeats)
        spectra_ms = 1e3 * timed(lambda: (block_spectrum(q), block_spectrum(k)), device, args.repeats)
        full_flops = full_attention_flops(args.batch, HQ, n, n, D)
        for mode in ("separate", "joint"):
            for r in args.ranks:
                low_ms = 1e3 * timed(lambda: low_rank_attention(q, k, v, r, mode), device, args.repeats)
                unfused_ms = 1e3 * timed(
                    lambda: low_rank_attention(q, k, v, r, mode, fused=False), device, args.repeats
                )
                flops = low_rank_attention_flops(args.batch, HQ, HKV, n, n, D, r, mode)
                print(
                    f"{n:>5} {mode:<9} {r:>3} {full_ms:>9.2f} {low_ms:>9.2f} {low_ms / full_ms:>10.2f} "
                    f"{unfused_ms:>10.2f} {unfused_ms / full_ms:>6.2f} "
                    f"{flops.core / full_flops.total:>10.3f} {flops.total / full_flops.total:>11.3f} "
                    f"{spectra_ms / low_ms:>13.2f}"
                )
    print()
    print("spectrum of (B, Hq, n, d) query blocks, ms (share of one full attention)")
    print(f"{'n':>5} {'gram+eigh':>16} {'linalg.svd':>16} {'svd_lowrank q=64':>18}")
    for n in args.lengths:
        q = torch.randn(args.batch, HQ, n, D, device=device, generator=generator)
        k = torch.randn(args.batch, HKV, n, D, device=device, generator=generator)
        v = torch.randn(args.batch, HKV, n, D, device=device, generator=generator)
        full_ms = 1e3 * timed(lambda: full_attention(q, k, v), device, args.repeats)
        cells = []
        for fn in (
            lambda: block_spectrum(q),
            lambda: torch.linalg.svd(q, full_matrices=False),
            lambda: torch.svd_lowrank(q.flatten(0, 1), q=D, niter=2),
        ):
            ms = 1e3 * timed(fn, device, args.repeats)
            cells.append(f"{ms:8.2f} ({ms / full_ms:4.2f}x)")
        print(f"{n:>5} {cells[0]:>16} {cells[1]:>16} {cells[2]:>18}")
    print()
    print("float64 eigh of a batch of 64 x 64 Grams, ms, by solver (the env's step: B * (Hq + Hkv) blocks a layer)")
    print(f"{'batch':>6} {'device':>10} {'host':>10} {'max |eigenvalue difference| / largest':>38}")
    for batch in (12, 96, 768):
        x = torch.randn(batch, 256, D, device=device, generator=generator) * torch.logspace(0, -3, D, device=device)
        gram = (x.transpose(-1, -2) @ x).double()
        cells, values = [], []
        for solver in ("device", "host"):
            spectra.set_eigh_solver(solver)
            cells.append(1e3 * timed(lambda: spectra.symmetric_eigh(gram), device, args.repeats))
            values.append(spectra.symmetric_eigh(gram)[0])
        spectra.set_eigh_solver("auto")
        error = float((values[0] - values[1]).abs().max() / values[1].abs().max())
        print(f"{batch:>6} {cells[0]:>10.2f} {cells[1]:>10.2f} {error:>38.1e}")


if __name__ == "__main__":
    main()
