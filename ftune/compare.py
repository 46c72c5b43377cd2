"""`ftune compare`: training arms x seeds over one common config, scored on the same held-out problems, with
intervals that carry both problem sampling and seed spread.

    ftune compare +recipe=quickstart --arm 'sft:' --arm 'mft: objective=masked_thought' --seeds 0,1,2 --out DIR

Each arm is a set of overrides over the common ones; each arm x seed is one `ftune train` run in DIR/runs/ARM-sSEED
(a subprocess: the real CLI, as a user would run it), evaluated at its end with the config's eval task (a
reasoning-gym eval scores trained and untrained tasks). The base model is scored at the start of the baseline arm's
runs (before its first step; with an adapter that starts as the identity, e.g. LoRA, that is the base model), on the
same problems as every arm of that seed. A finished run (its summary.json) is never run again: a killed comparison
resumes where it stopped, and an unfinished run continues from its last checkpoint (trainer.resume=auto).

DIR/compare.json and DIR/compare.md hold, per arm and per task group, the mean accuracy over seeds, the gain over
the base model and over the baseline arm, each with a 95% interval from a two-level bootstrap (seeds, then problems
within a seed, paired: ftune.eval.stats.paired_gain), and the budget each arm used (steps, tokens, seconds).
DIR/compare.png plots accuracy by arm with its interval, and the training loss curves.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from ftune.atomic import write_json_atomic
from ftune.config import ConfigError
from ftune.eval import stats


def parse_arm(text: str) -> tuple[str, list[str]]:
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"--arm {text!r}: write 'NAME: key=value ...' (NAME of letters, digits, - or _), e.g. "
                          f"--arm 'sft:' --arm 'mft: objective=masked_thought'.")
    overrides = shlex.split(rest)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"--arm {name}: {bad} are not key=value overrides.")
    return name, overrides


# What every arm must share: the budget (optimizer steps and examples per step), the model, the training tasks and
# the held-out problems. An arm that sets one of these is refused before any run starts (a comparison at unequal
# budgets or on other problems is not a comparison); set it in the common overrides instead.
SHARED = ("trainer.max_steps", "trainer.epochs", "trainer.batch_size", "trainer.grad_accum", "model", "data.source",
          "data.path", "data.hub_id", "data.hub_config", "data.split", "data.tasks", "data.size", "data.limit",
          "data.max_length", "data.eval_size", "data.eval_split", "eval")


def shared_key(override: str) -> str | None:
    """The shared setting an override changes (`eval.limit=10` -> `eval`, `model=x` -> `model`), or None."""
    key = override.split("=", 1)[0].lstrip("+~")
    for k in SHARED:
        if key == k or key.startswith(k + ".") or key.startswith(k + "["):
            return k
    return None


def check_shared(arms: list[tuple[str, list[str]]]) -> None:
    bad = [f"--arm {name}: {o}" for name, overrides in arms for o in overrides if shared_key(o)]
    if bad:
        raise ConfigError("arms must share the budget, model, training tasks and held-out problems, but "
                          + "; ".join(bad) + f" set one of them ({', '.join(SHARED)}). Put the setting in the common "
                          "overrides (before the first --arm) so that every arm gets it, or compare in a separate "
                          "--out directory.")


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: integers, e.g. --seeds 0,1,2.") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: one or more distinct seeds, e.g. --seeds 0,1,2.")
    return seeds


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / "runs" / f"{arm}-s{seed}"


def train_command(common: list[str], arm: list[str], seed: int, where: Path, baseline: bool) -> list[str]:
    cmd = [sys.executable, "-m", "ftune.cli", "train", *common, *arm, f"seed={seed}", f"output_dir={where}",
           f"eval.at_start={'true' if baseline else 'false'}", "eval.at_end=true", "trainer.progress=false"]
    if where.exists():  # an unfinished run of a killed comparison: go on from its last checkpoint
        cmd.append("trainer.resume=auto")
    return cmd


def finished(where: Path) -> bool:
    path = where / "summary.json"
    return path.is_file() and json.loads(path.read_text()).get("task_end") is not None


def read_scores(path: Path) -> dict[str, tuple[str, str, float]]:
    """{problem id: (task, question, 0/1 correct)} from an eval's predictions.jsonl."""
    out = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        out[r["id"]] = (r.get("task", "all"), r["question"], float(bool(r["correct"])))
    return out


def task_groups(metrics: dict) -> dict[str, list[str]]:
    """Task groups to report: every task alone, and `trained` / `untrained` / `all` where they apply."""
    tasks = metrics.get("tasks") or {}
    if not tasks:
        return {"all": ["all"]}
    groups = {name: [name] for name in tasks}
    trained = [n for n, m in tasks.items() if m.get("trained")]
    untrained = [n for n in tasks if n not in trained]
    if trained and untrained:
        groups.update(trained=trained, untrained=untrained)
    groups["all"] = list(tasks)
    return groups


def matrix(scores: list[dict], ids: list[str]) -> list[list[float]]:
    return [[s[i][2] for i in ids] for s in scores]


def summarize(arms: dict[str, list[dict]], base: list[dict] | None, baseline: str, groups: dict[str, list[str]],
              resamples: int = 2000) -> dict:
    """The comparison's numbers. `arms[name][k]` is seed k's {id: (task, question, correct)}; `base[k]` the base
    model's on the same problems. Per arm and group: accuracy, gain vs base, gain vs the baseline arm."""
    seeds = len(arms[baseline])
    for name, runs in arms.items():
        for k in range(seeds):
            ref = arms[baseline][k]
            if set(runs[k]) != set(ref) or any(runs[k][i][1] != ref[i][1] for i in ref):
                raise ConfigError(f"arm {name} (seed index {k}) was scored on other held-out problems than arm "
                                  f"{baseline}: arms must share the data and eval settings that choose them "
                                  f"(data.tasks, data.size, eval.tasks, eval.limit, eval.seed).")
    out: dict = {}
    for name, runs in arms.items():
        out[name] = {}
        for group, members in groups.items():
            ids = sorted(i for i, v in runs[0].items() if group == "all" or v[0] in members)
            if not ids:
                continue
            m = matrix(runs, ids)
            row = {"accuracy": stats.paired_gain(m, resamples=resamples)}
            if base is not None:
                row["gain_vs_base"] = stats.paired_gain(m, matrix(base, ids), resamples=resamples)
            if name != baseline:
                row[f"gain_vs_{baseline}"] = stats.paired_gain(m, matrix(arms[baseline], ids), resamples=resamples)
            out[name][group] = row
    return out


def pct(x: float) -> str:
    return f"{100 * x:+.1f}" if x < 0 else f"{100 * x:.1f}"


def cell(r: dict | None, signed: bool = False) -> str:
    if r is None:
        return "-"
    lo, hi = r["ci95"]
    sign = "+" if signed and r["mean"] >= 0 else ""
    return f"{sign}{pct(r['mean'])} [{pct(lo)}, {pct(hi)}]"


def markdown(result: dict) -> str:
    b, base = result["baseline"], result["base"]
    lines = [f"# ftune compare: {', '.join(result['arms'])}", "",
             f"Common overrides: `{' '.join(result['common']) or '(none)'}`; seeds {result['seeds']}; "
             f"{result['problems']} held-out problems per seed (the same problems for every arm of a seed).", "",
             "Accuracy in %, mean over seeds, with its 95% interval (bootstrap over seeds and, within each seed, "
             "over problems; gains paired on the same problems).", ""]
    lines += ["| arm | group | accuracy | gain vs base | gain vs " + b + " |", "|---|---|---|---|---|"]
    for arm, groups in result["table"].items():
        for group, r in groups.items():
            lines.append(f"| {arm} | {group} | {cell(r['accuracy'])} | {cell(r.get('gain_vs_base'), True)} | "
                         f"{cell(r.get(f'gain_vs_{b}'), True)} |")
    if base:
        lines += ["", "Base model (scored at the start of the " + b + " runs): " + ", ".join(
            f"{g} {cell(r)}" for g, r in base.items()) + "."]
    lines += ["", "Budget per arm (mean over seeds): every arm takes the same optimizer steps of the same batch size "
              "(ftune compare refuses arms that do not).", "",
              "| arm | steps | train tokens | train seconds |", "|---|---|---|---|"]
    for arm, bud in result["budget"].items():
        lines.append(f"| {arm} | {bud['steps']} | {bud['train_tokens']:.0f} | {bud['train_seconds']:.0f} |")
    lines += ["", "Command:", "", "    " + result["command"], ""]
    return "\n".join(lines)


def plot(result: dict, runs: dict[str, list[Path]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    groups = list(next(iter(result["table"].values())))
    width = 0.8 / len(result["table"])
    for j, (arm, table) in enumerate(result["table"].items()):
        xs = [g + j * width for g in range(len(groups))]
        means = [100 * table[g]["accuracy"]["mean"] for g in groups]
        err = [[100 * (table[g]["accuracy"]["mean"] - table[g]["accuracy"]["ci95"][0]) for g in groups],
               [100 * (table[g]["accuracy"]["ci95"][1] - table[g]["accuracy"]["mean"]) for g in groups]]
        ax1.bar(xs, means, width, yerr=err, capsize=3, label=arm)
    if result["base"]:
        for g, grp in enumerate(groups):
            if grp in result["base"]:
                ax1.hlines(100 * result["base"][grp]["mean"], g - width / 2, g + 0.8 - width / 2, colors="k",
                           linestyles="dashed", label="base" if g == 0 else None)
    ax1.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, rotation=20)
    ax1.set_ylabel("held-out accuracy (%), 95% interval")
    ax1.legend()
    for arm, dirs in runs.items():
        curves = []
        for d in dirs:
            rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] if (
                d / "metrics.jsonl").is_file() else []
            curves.append({r["step"]: r["loss"] for r in rows if "loss" in r and "step" in r})
        steps = sorted(set().union(*curves)) if curves else []
        mean = [stats.mean([c[s] for c in curves if s in c]) for s in steps]
        ax2.plot(steps, mean, label=arm)
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss (mean over seeds)")
    ax2.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def compare(common: list[str], arms: list[tuple[str, list[str]]], seeds: list[int], out: Path, baseline: str,
            command: str, resamples: int = 2000, runner=subprocess.run) -> dict:
    names = [a for a, _ in arms]
    if len(set(names)) != len(names):
        raise ConfigError(f"--arm names must be distinct: {names}.")
    if baseline not in names:
        raise ConfigError(f"--baseline {baseline}: no such arm (arms: {', '.join(names)}).")
    check_shared(arms)
    out.mkdir(parents=True, exist_ok=True)
    dirs: dict[str, list[Path]] = {a: [run_dir(out, a, s) for s in seeds] for a in names}
    for seed_index, seed in enumerate(seeds):  # seed-major: a killed comparison has whole seeds done
        for name, overrides in arms:
            where = dirs[name][seed_index]
            if finished(where):
                print(f"ftune compare: {name} seed {seed}: done earlier ({where})", flush=True)
                continue
            cmd = train_command(common, overrides, seed, where, name == baseline)
            print(f"ftune compare: {name} seed {seed}: {shlex.join(cmd[2:])}", flush=True)
            done = runner(cmd)
            if done.returncode != 0 or not finished(where):
                raise SystemExit(f"ftune compare: the run {where} failed (exit {done.returncode}); the runs finished "
                                 f"so far are kept, and rerunning the same command goes on from there.")
    scores = {a: [read_scores(d / "eval_end" / "predictions.jsonl") for d in dirs[a]] for a in names}
    base_dirs = [d / "eval_start" / "predictions.jsonl" for d in dirs[baseline]]
    base = [read_scores(p) for p in base_dirs] if all(p.is_file() for p in base_dirs) else None
    end_metrics = json.loads((dirs[baseline][0] / "eval_end" / "metrics.json").read_text())
    groups = task_groups(end_metrics)
    table = summarize(scores, base, baseline, groups, resamples)
    base_table = None
    if base is not None:
        base_table = {g: stats.paired_gain(matrix(base, sorted(i for i, v in base[0].items()
                                                                if g == "all" or v[0] in members)),
                                           resamples=resamples)
                      for g, members in groups.items()}
    budget, steps = {}, {}
    for a in names:
        sums = [json.loads((d / "summary.json").read_text()) for d in dirs[a]]
        budget[a] = {"steps": sums[0]["steps"], "train_tokens": stats.mean([s["train_tokens"] for s in sums]),
                     "train_seconds": stats.mean([s["train_seconds"] for s in sums])}
        steps[a] = {s["steps"] for s in sums}
    if len(set().union(*steps.values())) != 1:  # e.g. a run that stopped early: its arm had a smaller budget
        raise ConfigError("the arms' runs took different numbers of optimizer steps ("
                          + ", ".join(f"{a}: {sorted(v)}" for a, v in steps.items()) + "), so they did not share the "
                          f"budget: look at the runs in {out / 'runs'}, delete the odd ones and rerun the command.")
    result = {"arms": {a: o for a, o in arms}, "baseline": baseline, "common": common, "seeds": seeds,
              "problems": len(scores[baseline][0]), "table": table, "base": base_table, "budget": budget,
              "command": command,
              "runs": {a: [str(d) for d in ds] for a, ds in dirs.items()}}
    write_json_atomic(out / "compare.json", result, indent=2)
    tmp = out / "compare.md.tmp"
    tmp.write_text(markdown(result))
    tmp.replace(out / "compare.md")
    plot(result, dirs, out / "compare.png")
    print(markdown(result))
    return result


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="ftune compare", description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="overrides common to every arm, e.g. +recipe=quickstart")
    p.add_argument("--arm", action="append", required=True, metavar="'NAME: KEY=VALUE ...'",
                   help="an arm: its name and its own overrides (repeatable), e.g. --arm 'sft:'")
    p.add_argument("--seeds", default="0,1,2", help="training seeds (default 0,1,2)")
    p.add_argument("--out", required=True, help="directory for the runs and the report (reused to resume)")
    p.add_argument("--baseline", default=None, help="the arm gains are measured against (default: sft, else the "
                                                    "first arm); its runs also score the base model")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    a = p.parse_args(argv)
    try:
        arms = [parse_arm(t) for t in a.arm]
        seeds = parse_seeds(a.seeds)
        names = [n for n, _ in arms]
        baseline = a.baseline or ("sft" if "sft" in names else names[0])
        bad = [o for o in a.overrides if "=" not in o]
        if bad:
            raise ConfigError(f"{bad}: the common settings are key=value overrides (e.g. +recipe=quickstart).")
        if any(o.split("=", 1)[0].lstrip("+") in ("seed", "output_dir") for o in a.overrides + sum(
                (o for _, o in arms), [])):
            raise ConfigError("seed= and output_dir= are set by ftune compare (--seeds, --out); drop them.")
        compare(a.overrides, arms, seeds, Path(a.out), baseline, "ftune compare " + shlex.join(argv), a.resamples)
    except ConfigError as e:
        print(f"ftune: config error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
