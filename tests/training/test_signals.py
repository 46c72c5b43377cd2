"""StopOnSignal: the same signal again within a moment is the same event (a Ctrl-C reaches a rank from the terminal
and again from its launcher); a later one stops the process at once, with one line and no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from ftune.training.signals import StopOnSignal


def test_a_repeat_within_a_moment_is_the_same_event():
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job
    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # would stop the process if it counted as a second request
        assert stop.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before


def test_a_later_signal_stops_at_once_without_a_traceback():
    code = textwrap.dedent("""
        import os, signal, time
        from ftune.training.signals import StopOnSignal
        StopOnSignal.SAME_EVENT_S = 0.1
        with StopOnSignal() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.3)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        print("not reached")
    """)
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == -signal.SIGINT, (r.returncode, r.stderr)
    assert "stopped by signal 2 again" in r.stderr and "Traceback" not in r.stderr and "not reached" not in r.stdout
