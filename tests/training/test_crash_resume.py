"""SIGKILL a training subprocess at random moments (mid-step, mid-checkpoint), resume with trainer.resume=auto, and
compare with an uninterrupted run bit for bit: a short run of scripts/crash_test.py (the full one kills 20 times)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "crash_test.py"


@pytest.mark.slow
@pytest.mark.parametrize("peft", ["lora", "none"])
def test_killed_and_resumed_runs_equal_the_uninterrupted_run(tmp_path, peft):
    out = subprocess.run([sys.executable, str(SCRIPT), "--trials", "4", "--steps", "10", "--seed", "1",
                          "--peft", peft, "--workdir", str(tmp_path / "crash")],
                         capture_output=True, text=True, timeout=900,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "trials (SIGKILLs): 4;" in out.stdout
    assert "failures: 0" in out.stdout
    assert "identical to the reference" in out.stdout and "DIFFERS" not in out.stdout
