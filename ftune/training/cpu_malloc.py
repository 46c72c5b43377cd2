"""`trainer.cpu_malloc`: on a CPU run, keep the memory a step frees inside the process for the next step.

glibc's malloc gives every block above its mmap threshold (128 KiB at first, raised as blocks are freed, at most
32 MiB) a mapping of its own and unmaps it on free, and hands the free top of its heap back to the kernel. A training
step frees and allocates the same activation, gradient and logits buffers every step, so every step pays page faults
(the kernel zeroes each page again) for memory it just gave back: on SmolLM2-135M full fine-tuning (float32, 4 rows
of up to 512 tokens, 2 CPU cores) a third of the process's time was system time, and zeroing the 113 MB embedding
gradient took 180 ms. `reuse` sets glibc's mmap and trim thresholds to their largest values (`mallopt`), so freed
blocks stay in the heap and are handed out again; that run then went 1.12x as fast (benchmarks/README.md).
This is what the jemalloc / tcmalloc preloads recommended for PyTorch on CPUs do, without a preload; glibc has no
other switch for it, and `mallopt` is its documented interface. The price: the process's resident memory does not
shrink when a step's buffers are freed (the peak is unchanged), and a batch larger than any before still faults its
extra memory in, once.

Setting only the trim threshold is worse than glibc's defaults: it also freezes the mmap threshold at 128 KiB, so
every tensor gets its own mapping (0.74x the default's tokens/s in that benchmark).
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
_INT_MAX = 2**31 - 1  # mallopt takes an int
_applied = False


def _mallopt():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None


def apply(mode: str, device_type: str) -> str:
    """Apply trainer.cpu_malloc for a run on `device_type`; return what was done (for the run's log).

    auto: `reuse` when the run trains on the CPU (a GPU run's host memory is mostly the model being loaded, which should
    go back to the system once it is on the GPU). The setting is process-wide and stays for the rest of the process."""
    global _applied
    if mode == "system" or (mode == "auto" and device_type != "cpu"):
        if _applied:  # mallopt has no "back to the dynamic defaults"; say what the process really runs with
            return "reuse (set by an earlier run in this process; glibc's defaults cannot be put back)"
        return "system (glibc defaults)"
    if _applied:
        return "reuse (freed memory stays in the process)"
    mallopt = _mallopt()
    if mallopt is None:
        if mode == "reuse":
            log.warning("trainer.cpu_malloc=reuse needs glibc's malloc (Linux); this system's allocator is left "
                        "as it is.")
        return "system (not glibc)"
    ok = mallopt(M_MMAP_THRESHOLD, _INT_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, _INT_MAX) == 1
    if not ok:
        log.warning("glibc refused mallopt(M_MMAP_THRESHOLD / M_TRIM_THRESHOLD); trainer.cpu_malloc=%s has no "
                    "effect.", mode)
        return "system (mallopt refused)"
    _applied = True
    return "reuse (freed memory stays in the process)"
