"""trainer.cpu_malloc: with `reuse`, memory a step frees is handed out again without new page faults; with `system`
(and `auto` off the CPU) glibc's defaults stay. Each case runs in its own process: the setting is process-wide."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import make_cfg, run  # noqa: E402

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

PROBE = r"""
import resource, sys, torch
from ftune.training import cpu_malloc
print(cpu_malloc.apply(sys.argv[1], sys.argv[2]))
def churn(rounds):  # what training steps do: allocate, write and free buffers of activation and gradient sizes
    for _ in range(rounds):
        for n in (30_000_000, 3_000_000, 300_000):  # 120 MB (above glibc's 32 MiB mmap ceiling), 12 MB, 1.2 MB
            t = torch.empty(n)
            t.fill_(1.0)
            del t
churn(8)  # the heap grows over the first rounds (measured: 3 to 7) until the pattern fits in it
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn(4)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def faults(mode: str, device: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode, device], capture_output=True, text=True, check=True)
    what, n = out.stdout.strip().splitlines()[-2:]
    return what, int(n)


@pytest.mark.parametrize("mode", ["reuse", "auto"])
def test_reuse_serves_freed_buffers_without_page_faults(mode):
    what, n = faults(mode, "cpu")
    assert what.startswith("reuse")
    # 4 rounds of 133 MB = about 130,000 pages if each block were faulted in again; a few hundred is the interpreter.
    assert n < 2_000, n


@pytest.mark.parametrize("mode,device", [("system", "cpu"), ("auto", "cuda")])
def test_system_and_gpu_runs_keep_glibcs_defaults(mode, device):
    what, n = faults(mode, device)
    assert what.startswith("system")
    assert n > 4 * 29_000, n  # the 120 MB block is mapped and unmapped every time: at least its pages, each round


def test_a_later_system_run_in_the_same_process_is_told_the_truth():
    code = ("from ftune.training import cpu_malloc as c; print(c.apply('reuse', 'cpu')); "
            "print(c.apply('system', 'cpu')); print(c.apply('auto', 'cuda'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith("reuse") and all("set by an earlier run" in line for line in out[1:]), out


def test_the_trainer_applies_it_for_its_device_before_the_model_loads(tmp_path, monkeypatch):
    import ftune.models.loading as loading
    from ftune.training import cpu_malloc

    class Applied(Exception):
        pass

    def record(mode, device_type):
        raise Applied(mode, device_type)

    monkeypatch.setattr(cpu_malloc, "apply", record)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model loaded first"))
    with pytest.raises(Applied) as e:
        run(make_cfg(tmp_path / "run", "trainer.cpu_malloc=system"))
    assert e.value.args == ("system", "cpu")
