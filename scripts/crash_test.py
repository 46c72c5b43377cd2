"""Fault injection: SIGKILL training runs at random moments, resume each with trainer.resume=auto, and check that the
finished runs equal an uninterrupted one bit for bit (final weights and every step's loss).

    python scripts/crash_test.py                 # 20 kills (the default), about 5 minutes on two CPU cores
    python scripts/crash_test.py --trials 3      # a quick smoke run

Each trial is one SIGKILL of a `ftune train` subprocess (model=tiny_random, a generated JSONL set, LoRA with dropout
so the RNG state matters, or `--peft none` for full fine-tuning, a checkpoint every 2 steps). The moment is drawn at
random among:

- startup: a random delay after launch (imports, tokenization, model build, resume);
- step: a random delay (within the rest of the run) after the process logs its first new step;
- checkpoint: a random delay into the first, second or third save from there. `FTUNE_TEST_SAVE_PAUSE` (read by
  ftune.training.checkpoint.finalize, a test-only hook) widens the save so kills land before the manifest, between
  the manifest and the rename, or just after it.

After each kill the run is restarted with trainer.resume=auto; a run that finishes is compared with the reference
and a new run begins until the trials are used up. A restart that fails, or a finished run that differs from the
reference, is a failure. Exit status: 0 if no failures. CPU only, one thread per process, fixed seed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_data(path: Path, n: int = 64) -> None:
    rows = [{"id": f"ex{i}", "prompt": f"What is {i} plus {i % 7}?", "completion": f"{i} plus {i % 7} is {i + i % 7}."}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def overrides(data: Path, out: Path, steps: int, seed: int, resume: bool, peft: str = "lora") -> list[str]:
    method = ["peft=lora", "peft.dropout=0.1"] if peft == "lora" else ["peft=none"]
    return ["model=tiny_random", "data=jsonl", f"data.path={data}", "data.eval_size=0", "data.max_length=128",
            "eval=none", f"trainer.max_steps={steps}", "trainer.save_every=2", "trainer.keep_last=2",
            "trainer.batch_size=4", "trainer.lr=5e-3", "trainer.warmup_ratio=0", "trainer.progress=false",
            *method, f"seed={seed}", f"output_dir={out}", *(["trainer.resume=auto"] if resume else [])]


def launch(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        f.write(f"\n==== launch {time.strftime('%H:%M:%S')}\n".encode())
        return subprocess.Popen([sys.executable, "-m", "ftune.cli", "train", *args], stdout=f, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT)


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _tmp_dirs(run: Path) -> set[tuple[str, int]]:
    found = set()
    for d in (run / "checkpoints", run):
        if d.is_dir():
            for p in d.glob(".tmp-*"):
                ino = _inode(p)
                if ino is not None:
                    found.add((p.name, ino))
    return found


def _complete_steps(run: Path) -> list[int]:
    from ftune.training import checkpoint as ckpt

    return [ckpt.step_of(p) for p in ckpt.list_checkpoints(run / "checkpoints") if (p / ckpt.MANIFEST).exists()]


def _new_step_logged(metrics: Path, inode0: int | None, after: int) -> bool:
    """The process wrote a step past its resume point (MetricsLog rewrites the file on start, hence the inode)."""
    if _inode(metrics) in (None, inode0):
        return False
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return False
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in rec and rec.get("step", 0) > after:
            return True
    return False


def wait_until(proc: subprocess.Popen, predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        if predicate():
            return True
        time.sleep(0.002)
    return False


def inject(proc: subprocess.Popen, run: Path, mode: str, rng: random.Random, timing: dict) -> str | None:
    """Kill `proc` at a moment chosen by `mode`; returns a description, or None if it finished first."""
    t0 = time.monotonic()
    at_launch = _tmp_dirs(run)
    steps = _complete_steps(run)
    resume_step = steps[-1] if steps else 0
    if mode == "startup":
        delay = rng.uniform(0.2, timing["startup"])
        ready = wait_until(proc, lambda: time.monotonic() - t0 >= delay, delay + 5)
    elif mode == "step":
        inode0 = _inode(run / "metrics.jsonl")
        ready = wait_until(proc, lambda: _new_step_logged(run / "metrics.jsonl", inode0, resume_step), 600)
        if ready:  # anywhere in the rest of the run (its steps and its saves)
            left = timing["steps"] - resume_step
            time.sleep(rng.uniform(0, left * timing["step"] + left / 2 * timing["pause"]))
    else:
        before = _tmp_dirs(run)
        skip = rng.randrange(3)  # the first, second or third save from here, so runs progress between kills
        seen: set = set()

        def nth_save_started() -> bool:
            seen.update(_tmp_dirs(run) - before)  # a finished save's temporary dir is gone: count all seen
            return len(seen) > skip

        ready = wait_until(proc, nth_save_started, 600)
        if ready:
            time.sleep(rng.uniform(0, 1.2 * timing["pause"]))
    if proc.poll() is not None:
        return None
    proc.kill()  # SIGKILL: no handler runs, nothing is flushed
    proc.wait()
    leftovers = sorted(name for name, _ in _tmp_dirs(run))
    in_save = ""
    for name, _ in _tmp_dirs(run) - at_launch:  # a save this process had started and not renamed
        tmp = (run / "checkpoints" if name.startswith(".tmp-checkpoint") else run) / name
        in_save = f"; inside the save of {name[5:]}, " + ("manifest written" if (tmp / "manifest.json").exists()
                                                          else "before the manifest")
    return (f"{mode:10s} at {time.monotonic() - t0:5.2f}s (resumed from step {resume_step}; complete checkpoints "
            f"now {_complete_steps(run)}, temporary dirs {leftovers}{in_save})")


def compare(ref: Path, run: Path) -> list[str]:
    """Differences between two finished runs: final weight tensors (adapter or full model) and the loss of every
    step, bitwise."""
    import torch
    from safetensors.torch import load_file

    problems = []
    files = sorted(p.name for p in (ref / "final").glob("*.safetensors"))
    theirs = sorted(p.name for p in (run / "final").glob("*.safetensors"))
    if files != theirs:
        problems.append(f"weight files differ: {files} vs {theirs}")
    for name in files:
        if not (run / "final" / name).exists():
            continue
        a, b = load_file(ref / "final" / name), load_file(run / "final" / name)
        if a.keys() != b.keys():
            problems.append(f"{name}: keys differ: {sorted(set(a) ^ set(b))[:4]}")
        differing = [k for k in a if k in b and not torch.equal(a[k], b[k])]
        if differing:
            worst = max(float((a[k] - b[k]).abs().max()) for k in differing)
            problems.append(f"{name}: {len(differing)} of {len(a)} tensors differ (max abs diff {worst:.3e}), "
                            f"e.g. {differing[0]}")

    def losses(r: Path) -> list[tuple[int, float]]:
        recs = [json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return [(x["step"], x["loss"]) for x in recs if "loss" in x]

    la, lb = losses(ref), losses(run)
    if la != lb:
        diff = next(((x, y) for x, y in zip(la, lb) if x != y), None)
        problems.append(f"loss trajectories differ ({len(la)} vs {len(lb)} records; first difference {diff})")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20, help="SIGKILLs to inject (default 20)")
    ap.add_argument("--steps", type=int, default=16, help="optimizer steps per run")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill schedule and of the training runs")
    ap.add_argument("--peft", choices=("lora", "none"), default="lora", help="LoRA with dropout, or full fine-tuning")
    ap.add_argument("--pause", type=float, default=0.4, help="FTUNE_TEST_SAVE_PAUSE for the killed runs (seconds)")
    ap.add_argument("--workdir", type=Path, default=None, help="where runs go (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="ftune-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1",
           "FTUNE_HOME": os.environ.get("FTUNE_HOME", str(work / "home"))}
    env.pop("FTUNE_TEST_SAVE_PAUSE", None)
    data = work / "data.jsonl"
    write_data(data)
    rng = random.Random(args.seed)

    print(f"work dir: {work}")
    ref = work / "reference"
    tic = time.monotonic()
    proc = launch(overrides(data, ref, args.steps, args.seed, False, args.peft), env, work / "reference.log")
    if proc.wait() != 0:
        print(f"reference run failed; see {work / 'reference.log'}")
        return 2
    summary = json.loads((ref / "summary.json").read_text())
    step_time = summary["train_seconds"] / max(summary["steps"], 1)
    timing = {"startup": max(1.0, time.monotonic() - tic - summary["train_seconds"]), "step": step_time,
              "pause": args.pause, "steps": args.steps}
    print(f"reference: {summary['steps']} steps in {time.monotonic() - tic:.1f}s (step {1000 * step_time:.0f} ms, "
          f"startup about {timing['startup']:.1f}s)")

    kill_env = {**env, "FTUNE_TEST_SAVE_PAUSE": str(args.pause)}
    trials, failures, runs_done = 0, [], 0
    modes = ("startup", "step", "checkpoint")
    run_index = 0
    while trials < args.trials:
        run = work / f"run{run_index}"
        log = work / f"run{run_index}.log"
        kills_in_run = 0
        while True:
            proc = launch(overrides(data, run, args.steps, args.seed, True, args.peft), kill_env, log)
            what = None
            if trials < args.trials:
                mode = rng.choices(modes, weights=(0.2, 0.4, 0.4))[0]
                what = inject(proc, run, mode, rng, timing)
            if what is not None:
                trials += 1
                kills_in_run += 1
                print(f"trial {trials:2d} run{run_index}: killed {what}", flush=True)
                continue
            rc = proc.wait()
            if rc != 0:
                failures.append(f"run{run_index}: a restart exited with {rc} (see {log})")
                print(f"FAIL run{run_index}: restart exited with {rc}; last lines of {log}:")
                print("\n".join(log.read_text(errors="replace").splitlines()[-15:]))
                break
            problems = compare(ref, run)
            runs_done += 1
            status = "identical to the reference" if not problems else "DIFFERS: " + "; ".join(problems)
            print(f"run{run_index}: finished after {kills_in_run} kill(s), {status}", flush=True)
            failures += [f"run{run_index}: {p}" for p in problems]
            break
        run_index += 1

    print(f"\ntrials (SIGKILLs): {trials}; finished runs compared: {runs_done}; failures: {len(failures)}")
    for f in failures:
        print(f"  - {f}")
    if not args.keep and not failures and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
