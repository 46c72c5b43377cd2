"""`trainer.mixed_precision=auto`: bf16 autocast where this machine runs it faster than float32, float32 where not.

- A CUDA GPU with bf16 (Ampere and later): bf16, the fast path of every current GPU. An older GPU keeps float32:
  fp16 needs a loss scale and stays an explicit choice (`trainer.mixed_precision=fp16`).
- A CPU: its flags do not tell. A CPU that reports avx512_bf16 can run bf16 products slower than float32 ones
  (a 2-vCPU Xeon: 146 against 253 GFLOP/s), while one whose bf16 dot products are native runs them several times
  faster (a 2-vCPU AMD EPYC: 814 against 191). So auto times one product of a transformer layer's shape both ways, as
  the training step would run it (float32 operands; under bf16 autocast, cast and multiplied in bf16), and picks bf16
  only when it is at least `CPU_MARGIN` times as fast: near parity float32 keeps its precision.
- Any other device (MPS, XPU, ...): float32.

Every process measures for itself; `make_accelerator` then makes all of them take rank 0's choice.
"""

from __future__ import annotations

import functools
import time

import torch

CPU_MARGIN = 1.2
SHAPE = (2048, 1024, 1024)  # rows x in x out: a batch of 2k tokens through a 1k-wide projection


def _gflops(bf16: bool, shape: tuple[int, int, int] = SHAPE, repeats: int = 3) -> float:
    """Best-of-`repeats` GFLOP/s of one float32 (m x k) @ (k x n) product on the CPU, under bf16 autocast or not."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        a @ b  # warm-up: the kernel's first call allocates and picks its blocking
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best / 1e9


@functools.cache
def cpu_rates() -> tuple[float, float]:
    """(float32, bf16 autocast) GFLOP/s of `SHAPE` on this CPU, measured once per process (about 0.1-1 s)."""
    try:
        bf16 = _gflops(True)
    except RuntimeError:  # a torch build without CPU bf16 kernels
        bf16 = 0.0
    return _gflops(False), bf16


def cpu_choice(fp32: float, bf16: float) -> str:
    return "bf16" if bf16 >= CPU_MARGIN * fp32 else "no"


def gpu_runs_bf16() -> bool:
    """Whether this CUDA GPU runs bf16 natively (emulated bf16, before Ampere, is slow and does not count)."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve(requested: str, device: str) -> tuple[str, str]:
    """(the precision Accelerator gets, why) for `trainer.mixed_precision=requested` on a `device` ('cuda', 'cpu',
    ...). Anything but "auto" is kept as it is."""
    if requested != "auto":
        return requested, f"trainer.mixed_precision={requested}"
    if device == "cuda":
        if gpu_runs_bf16():
            return "bf16", "trainer.mixed_precision=auto: bf16 (this GPU supports it)"
        return "no", ("trainer.mixed_precision=auto: float32 (this GPU has no bf16; fp16 with a loss scale is "
                      "trainer.mixed_precision=fp16)")
    if device != "cpu":
        return "no", f"trainer.mixed_precision=auto: float32 (on {device})"
    fp32, bf16 = cpu_rates()
    choice = cpu_choice(fp32, bf16)
    return choice, (f"trainer.mixed_precision=auto: {'bf16 autocast' if choice == 'bf16' else 'float32'} (this CPU: "
                    f"{bf16:.0f} GFLOP/s under bf16 autocast against {fp32:.0f} in float32 on a "
                    f"{'x'.join(map(str, SHAPE))} product; bf16 needs {CPU_MARGIN}x)")
