"""`ftune <command> [hydra overrides]`: a thin dispatcher over the Hydra entry points."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys

COMMANDS = {
    "train": ("ftune.train", "fine-tune a model: ftune train +recipe=NAME [key=value ...]"),
    "eval": ("ftune.evaluate", "task accuracy of a model or a run: ftune eval run_dir=PATH [eval.limit=N]"),
    "generate": ("ftune.generate", "answer a prompt: ftune generate prompt='...' [run_dir=PATH]"),
    "select": ("ftune.select", "choose a training subset: ftune select selection=kmq selection.budget=N [data=...]"),
    "merge": ("ftune.merge", "fold a run's adapter into its base model: ftune merge RUN_DIR [--out DIR] [--force]"),
    "soup": ("ftune.soup", "average fine-tunes of one base: ftune soup RUN_DIR RUN_DIR ... --out DIR [--greedy]"),
    "compare": ("ftune.compare", "arms x seeds with intervals: ftune compare +recipe=NAME --arm 'sft:' --arm "
                "'NAME: key=value ...' --out DIR"),
    "recipes": (None, "list the recipes with their one-line descriptions"),
}

USAGE = """usage: ftune <command> [overrides ...] [hydra flags]

Commands:
{commands}

Overrides are Hydra's: `trainer.lr=1e-4`, `peft=qlora`, `+recipe=lora_gsm8k`. Hydra flags work on train, eval and
generate: `--cfg job` (print the composed config), `--info defaults`, `--config-dir DIR` (your own configs),
`-m` (sweeps, one process). `ftune <command> --help` shows that command's config groups and options.
"""


def _pop_nproc(args: list[str]) -> tuple[int, list[str]]:
    """`--nproc N` / `--nproc=N` out of the arguments."""
    out, nproc, i = [], 1, 0
    while i < len(args):
        a = args[i]
        if a == "--nproc" or a.startswith("--nproc="):
            value = a.partition("=")[2] if "=" in a else (args[i + 1] if i + 1 < len(args) else "")
            i += 1 if "=" in a else 2
            if not value.isdigit() or int(value) < 1:
                print(f"ftune: config error: --nproc needs a number of processes >= 1, got {value!r}.",
                      file=sys.stderr)
                sys.exit(2)
            nproc = int(value)
            continue
        out.append(a)
        i += 1
    return nproc, out


def overrides_before_flags(argv: list[str]) -> list[str]:
    """`a=1 --cfg job b=2` in the order Hydra reads it (its overrides are one run of positional arguments, so Hydra
    alone refuses `b=2`): Hydra's own argument parser finds the overrides, which go first, in their order, and the
    flags follow. A command line it cannot parse is left as it is, for Hydra to say what is wrong."""
    import contextlib
    import io

    from hydra._internal.utils import get_args_parser  # the parser hydra.main uses

    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            overrides = get_args_parser().parse_intermixed_args(argv).overrides
    except SystemExit:
        return argv
    flags = list(argv)
    for o in overrides:
        flags.remove(o)
    return [*overrides, *flags]


def launch(nproc: int, args: list[str]) -> int:
    """`ftune train --nproc N ...`: N data-parallel processes on this machine with torchrun (DDP through
    accelerate: NCCL on GPUs, gloo on CPU). The run directory is chosen once here so every rank writes to the same
    one. Multi-node: use `torchrun` or `accelerate launch` with their own flags and `-m ftune.train`."""
    import datetime
    import socket

    import torch

    from ftune.training.distributed import gpu_shortage

    if short := gpu_shortage(nproc):  # said before any process starts
        print(f"ftune: config error: {short}", file=sys.stderr)
        return 2
    env = dict(os.environ, FTUNE_NPROC=str(nproc))
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"  # without it, CPU processes never join one group (no gradient sync)
    if "OMP_NUM_THREADS" not in env:  # torchrun's default is 1 thread per process (and a banner saying so)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        env["OMP_NUM_THREADS"] = "1" if torch.cuda.is_available() else str(max(1, cores // nproc))
    if not any(a.startswith("output_dir=") for a in args):
        now = datetime.datetime.now()
        args = [f"output_dir=outputs/{now:%Y-%m-%d}/{now:%H-%M-%S-%f}", *args]  # Hydra: overrides before flags
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(env)
    return _torchrun(["--nnodes=1", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={port}",
                      "-m", "ftune.train", *args])


class _Held(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _torchrun(argv: list[str]) -> int:
    """torchrun's launcher, run in this process (its workers are processes of their own).

    - Errors: torchrun's agent reports a failed rank with log lines, a failure table and a traceback. When the ranks
      stopped on an error ftune explains (exit code 2, its paragraph already printed) or on a signal after saving a
      checkpoint (128 + the signal), that report says nothing more and is dropped; any other failure (a crash, a rank
      killed for memory) shows the agent's log lines and failure table.
    - Signals: on SIGTERM or SIGINT torchrun would forward the signal and kill the ranks 30 s later, so a checkpoint
      that takes longer to write would be lost. Here the first signal is forwarded and the ranks are left to finish
      their step and save (`StopOnSignal`); the same signal again within a moment is the same event (Ctrl-C reaches
      every process of the terminal's group); a later one stops everything as torchrun does.
    """
    import time

    import torch.distributed.elastic.multiprocessing.api as elastic
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from ftune.training.signals import StopOnSignal

    first: dict = {}
    torchrun_handler = elastic._terminate_process_handler

    def on_signal(signum, frame):
        if not first:
            first.update(signum=signum, at=time.monotonic())
            for pid in _children():
                with contextlib.suppress(OSError):
                    os.kill(pid, signum)
        elif signum != first["signum"] or time.monotonic() - first["at"] >= StopOnSignal.SAME_EVENT_S:
            torchrun_handler(signum, frame)  # asked twice: torchrun's own shutdown

    agent, held = logging.getLogger("torch.distributed.elastic"), _Held()
    agent.addHandler(held)
    agent.propagate = False
    elastic._terminate_process_handler = on_signal  # what torchrun registers for its signals when it starts
    try:
        torchrun.run(torchrun.parse_args(argv))
        return 0
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        code = e.get_first_failure()[1].exitcode
        # Once one rank has exited, the agent stops the others with SIGTERM; they show up as failures too.
        expected = {2} if code == 2 else {128 + signal.SIGINT, 128 + signal.SIGTERM} if first else set()
        if code in expected and all(c in expected or c == -signal.SIGTERM for c in codes):
            return code
        _replay(agent, held)
        print(e.format_msg(), file=sys.stderr)
        return next((c for c in codes if c > 0), 1)
    except elastic.SignalException as e:  # a second signal: torchrun has stopped the ranks
        print(f"ftune: stopped by signal {int(e.sigval)} again; the ranks were stopped without finishing their step "
              f"(an unfinished checkpoint is never used: resume takes the newest complete one).", file=sys.stderr)
        return 128 + int(e.sigval)
    except BaseException:
        _replay(agent, held)
        raise
    finally:
        elastic._terminate_process_handler = torchrun_handler
        agent.removeHandler(held)
        agent.propagate = True


def _children() -> list[int]:
    """This process's child processes (torchrun's ranks), from /proc; none where there is no /proc."""
    from pathlib import Path

    me, out = os.getpid(), []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            # /proc/PID/stat: "pid (name) state ppid ...": the name may hold spaces and parentheses
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == me:
                out.append(int(entry.name))
    return out


def _replay(agent: logging.Logger, held: _Held) -> None:
    agent.propagate = True
    for record in held.records:
        if agent.parent is not None:
            agent.parent.handle(record)
    held.records.clear()


def list_recipes() -> list[tuple[str, str]]:
    """(name, description) of each recipe: the first comment line of recipes/NAME.yaml."""
    from ftune.paths import recipes_dir

    out = []
    for path in sorted(recipes_dir().glob("*.yaml")):
        desc = ""
        for line in path.read_text().splitlines():
            if line.startswith("#") and "@package" not in line:
                desc = line.lstrip("# ").strip()
                break
        out.append((path.stem, desc))
    return out


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    from ftune.run_record import LOG_FORMAT

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(commands="\n".join(f"  {k:9s} {v[1]}" for k, v in COMMANDS.items())))
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"ftune: unknown command '{command}'.{hint} Commands: {', '.join(COMMANDS)}.", file=sys.stderr)
        sys.exit(2)
    if command == "recipes":
        for name, desc in list_recipes():
            print(f"{name:24s} {desc}")
        return
    # Users' own objectives / PEFT methods are importable from the launch directory (`_target_: mymod.MyLoss`).
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    import importlib

    if command == "compare":  # its own flags (--arm 'NAME: k=v'): the overrides go to each `ftune train` it runs
        importlib.import_module("ftune.compare").main(rest)
        return
    nproc, rest = _pop_nproc(rest) if command == "train" else (1, rest)
    from ftune.reporting import HYDRA_COMMANDS, run_hydra_main

    if command in HYDRA_COMMANDS:
        rest = overrides_before_flags(rest)
    if nproc > 1:
        sys.exit(launch(nproc, rest))
    module = importlib.import_module(COMMANDS[command][0])
    from ftune.config import register_configs

    register_configs(command)  # recipes with the parts this command reads
    sys.argv = [f"ftune {command}", *rest]
    if command in HYDRA_COMMANDS:
        run_hydra_main(module.main, command, rest)
    else:
        module.main()


if __name__ == "__main__":
    main()
