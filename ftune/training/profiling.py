"""`trainer.profile_steps`: torch.profiler over a few training steps, written to OUTPUT_DIR/profile/.

torch's own profiler (what torchtune's profiler component and the PyTorch TensorBoard plugin use); ftune only
chooses which steps to record and writes the two views a user asks for first: a Chrome/Perfetto trace and the
operator table sorted by self time.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ftune.atomic import write_text_atomic

log = logging.getLogger("ftune")


def step_profiler(t, out: Path, rank: int):
    """A profiler: `.start()` before the loop, `.step()` after every optimizer step, `.stop()` after the loop; a
    no-op when profile_steps is 0.

    Steps are counted from the start of this process (a resumed run counts from its resume): steps
    profile_from .. profile_from + profile_steps - 1 are recorded; the step before them runs under the profiler
    unrecorded (its warm-up), the ones before that without it.
    """
    if not t.profile_steps:
        return _Off()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    warmup = 1 if t.profile_from > 1 else 0
    schedule = torch.profiler.schedule(wait=t.profile_from - 1 - warmup, warmup=warmup, active=t.profile_steps,
                                       repeat=1)
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"

    def write(prof) -> None:
        folder = out / "profile"
        folder.mkdir(parents=True, exist_ok=True)
        trace, table = folder / f"trace_rank{rank}.json", folder / f"ops_rank{rank}.txt"
        prof.export_chrome_trace(str(trace.with_suffix(".json.tmp")))  # whole files only, as for checkpoints
        os.replace(trace.with_suffix(".json.tmp"), trace)
        write_text_atomic(table, f"torch.profiler, {t.profile_steps} step(s) from step {t.profile_from} of this "
                                 f"process, sorted by {sort}\n\n"
                                 + prof.key_averages().table(sort_by=sort, row_limit=40) + "\n")
        prof.written = True
        log.info("profile of %d step(s): %s (open in https://ui.perfetto.dev or chrome://tracing) and %s",
                 t.profile_steps, trace, table)

    return _Profile(activities=activities, schedule=schedule, on_trace_ready=write, record_shapes=True,
                    profile_memory=True, profile_from=t.profile_from)


class _Profile(torch.profiler.profile):
    """torch's profiler that says so when the run ended before the recorded window began."""

    def __init__(self, *args, profile_from: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.profile_from, self.written = profile_from, False

    def stop(self) -> None:
        super().stop()
        if not self.written:
            log.warning("trainer.profile_from=%d: this process ran fewer steps than that (a resumed run counts from "
                        "its resume), so no profile was written; lower trainer.profile_from.", self.profile_from)


class _Off:
    def start(self) -> None:
        pass

    step = stop = start
