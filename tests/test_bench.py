"""The benchmark suite's own arithmetic (scripts/bench): the random architectures have the published parameter
counts, the FLOPs-per-token formulas, and the verdict of the side-by-side table."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _engine():
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "scripts" / "bench_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Tok:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 2


@pytest.mark.parametrize("name,published", [
    ("llama_1b_random", 1_235_814_400),  # Llama-3.2-1B
    ("llama_3b_random", 3_212_749_824),  # Llama-3.2-3B
    ("llama_8b_random", 8_030_261_248),  # Llama-3.1-8B
])
def test_random_architectures_have_the_published_parameter_counts(name, published):
    import torch
    from transformers import LlamaForCausalLM

    from scripts.bench.models import ARCHS, llama_config

    config = llama_config(name, _Tok())
    with torch.device("meta"):
        n = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    # By hand: embedding V*h (+ an untied head V*h), per layer q,o h*h, k,v h*kv*hd, MLP 3*h*i, 2 norms h; final norm.
    h, layers, heads, kv, inter, tied, _ = ARCHS[name]
    hd, v = h // heads, 128_256
    by_hand = v * h * (1 if tied else 2) + layers * (2 * h * h + 2 * h * kv * hd + 3 * h * inter + 2 * h) + h
    assert n == by_hand == published
    assert config.rope_parameters["rope_theta"] == 500_000.0


def test_flops_per_token():
    eng = _engine()
    params = {"base": 1000, "lora": 10, "layers": 2, "attention_width": 8}
    assert eng.flops_per_token(params, "sft", "lora")[0] == 4 * 1000 + 6 * 10
    assert eng.flops_per_token(params, "sft", "full")[0] == 6 * 1000
    assert eng.flops_per_token(params, "dpo", "lora")[0] == 6 * 1000 + 6 * 10
    assert eng.flops_per_token(params, "dpo", "full")[0] == 8 * 1000
    # Causal attention over a context of 5: forward 2*L*A*T, training 3x; DPO's reference adds one forward.
    assert eng.flops_per_token(params, "sft", "lora", 5.0)[0] == 4 * 1000 + 6 * 10 + 6 * 2 * 8 * 5
    assert eng.flops_per_token(params, "dpo", "full", 5.0)[0] == 8 * 1000 + 8 * 2 * 8 * 5
    rows = [{"input_ids": [0] * 3, "labels": [0] * 3},
            {**{f"{s}_input_ids": [0] * n for s, n in (("chosen", 4), ("rejected", 1))},
             **{f"{s}_labels": [0] * n for s, n in (("chosen", 4), ("rejected", 1))}}]
    assert eng.attention_context(rows) == (9 + 16 + 1) / (3 + 4 + 1)


def test_attention_flops_are_half_the_full_score_matrix(tmp_path):
    """torch's FLOP counter on a tiny Llama (eager attention, grouped-query heads) trained on one sequence of T tokens:
    the products beyond the linear layers' 6 FLOPs per weight and token are the full T x T scores and their product
    with the values; flops_per_token counts the causal half of them."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    eng = _engine()
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
                         attn_implementation="eager")
    config.save_pretrained(tmp_path)
    params = eng.param_counts(tmp_path)
    assert (params["layers"], params["attention_width"]) == (2, 64)  # 4 heads x 16, wider than the hidden size
    model = LlamaForCausalLM(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    t = 16
    with FlopCounterMode(display=False) as counter:
        model(torch.arange(t)[None], labels=torch.arange(t)[None], use_cache=False).loss.backward()
    attention = counter.get_total_flops() - 6 * linear * t
    causal = eng.flops_per_token({**params, "base": 0, "lora": 0}, "sft", "full", float(t))[0] * t
    assert attention == 2 * causal > 0


@pytest.mark.parametrize("peft,per_param", [("lora", 4), ("full", 6)])
def test_model_matmul_shapes_add_up_to_the_flops_formula(tmp_path, peft, per_param):
    """The products timed for the model-shape matmul rate are the ones flops_per_token counts: forward + activation
    gradient (LoRA: 4 FLOPs per weight and token), plus the weight gradient under full fine-tuning (6)."""
    from transformers import LlamaConfig

    eng = _engine()
    LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=False).save_pretrained(tmp_path)
    rows = 24
    shapes = eng.model_matmul_shapes(tmp_path, rows, peft)
    linear = 2 * (3 * 32 * 64 + 32 * 32 * 2 + 32 * 16 * 2) + 32 * 96  # mlp, q/o, k/v per layer; the LM head
    assert sum(2 * m * k * n * c for m, k, n, c in shapes) == per_param * rows * linear
    assert (rows, 32, 96, 1) in shapes and (rows, 96, 32, 1) in shapes  # the head, forward and activation gradient
    rate = eng.shape_matmul_rate(shapes, "cpu", repeats=1, dtypes=("fp32",))
    assert set(rate) == {"fp32"} and 0 < rate["fp32"] < 1e6  # GFLOP/s, finite


def test_suite_table_verdict():
    from scripts.bench.__main__ import legend_text, suite_rows, table

    def result(fw, tps, mem, mfu):
        return {"framework": fw, "packing": False, "tokens_per_s": tps, "peak_memory_mib": mem, "mfu": mfu}

    cpu = {"meta": {"device": "cpu"}, "results": [result("ftune", 300.0, 900.0, 0.85), result("trl", 150.0, 1000.0,
                                                                                                 0.4)]}
    f, t = suite_rows("sft-lora", cpu)
    assert f["ratio"] == pytest.approx(2.0) and f["memory_ratio"] == pytest.approx(0.9)
    assert f["target_met"] is True and t["ratio"] == 1.0 and t["target_met"] is None
    slow = {"meta": {"device": "cpu"}, "results": [result("ftune", 200.0, 1100.0, 0.5), result("trl", 150.0, 1000.0,
                                                                                                 0.4)]}
    f, _ = suite_rows("full-ft", slow)  # 1.33x < 1.5x, more memory than TRL, 50% < 80% MFU
    assert f["target_met"] is False and f["missed"] == ["speed", "memory", "MFU"]
    gpu = {"meta": {"device": "cuda"}, "results": [result("ftune", 140.0, 2000.0, 0.46), result("trl", 100.0,
                                                                                                  1000.0, 0.3)]}
    f, _ = suite_rows("sft-lora", gpu)  # GPU: 1.4x >= 1.3x and 46% >= 45%; memory is not part of the GPU target
    assert f["target_met"] is True
    assert "no (speed, memory, MFU)" in table(suite_rows("full-ft", slow), markdown=True)
    # a GPU's packed TRL rows are padding-free: the legend says what they measure on SDPA; not on a CPU or unpacked
    packed = {"meta": {"device": "cuda"}, "results": [{**r, "packing": True} for r in gpu["results"]]}
    assert "padding-free" in legend_text("cuda", suite_rows("sft-lora", packed))
    assert "padding-free" not in legend_text("cuda", suite_rows("sft-lora", gpu))
    assert "padding-free" not in legend_text("cpu", suite_rows("sft-lora", {**packed, "meta": {"device": "cpu"}}))
    assert "at <= TRL's peak memory" in legend_text("cpu", []) and "memory" not in legend_text("cuda", [])


def test_repeats_run_in_abba_order_and_combine_to_the_median(monkeypatch):
    """--repeats N: each tool measured N times, alternating which goes first; the table gets the median tokens/s,
    the largest peak memory, and the k-th ftune run over the k-th TRL run as the per-run ratios."""
    from types import SimpleNamespace

    from scripts.bench.__main__ import suite_rows, table
    from scripts.bench.report import run_ratios

    eng = _engine()
    speeds = {"ftune": iter([300.0, 360.0, 270.0]), "trl": iter([150.0, 200.0, 90.0])}  # means 310, 146.7
    order = []

    def fake_measure(a, fw, packing, precision, env, work, model_dir, rep):
        order.append((rep, fw))
        return {"framework": fw, "packing": packing, "exit_code": 0, "tokens_per_s": next(speeds[fw]),
                "tokens_per_cpu_s": 1.0, "peak_rss_mib": 1000.0 + 10 * rep + (500 if fw == "trl" else 0)}

    monkeypatch.setattr(eng, "measure", fake_measure)
    res = eng.measure_all(SimpleNamespace(repeats=3), [False], ["ftune", "trl"], "bf16", {}, Path("."), Path("."))
    assert order == [(0, "ftune"), (0, "trl"), (1, "trl"), (1, "ftune"), (2, "ftune"), (2, "trl")]
    f, t = res
    assert (f["tokens_per_s"], t["tokens_per_s"]) == (300.0, 150.0)  # medians
    assert (f["peak_rss_mib"], t["peak_rss_mib"]) == (1020.0, 1520.0)  # the largest of the three
    assert [x["tokens_per_s"] for x in f["repeats"]] == [300.0, 360.0, 270.0]
    assert run_ratios(f, t) == pytest.approx([2.0, 1.8, 3.0])
    one = eng.combine_repeats([{"tokens_per_s": 5.0, "exit_code": 0}])
    assert "repeats" not in one and one["tokens_per_s"] == 5.0
    failed = eng.combine_repeats([{"tokens_per_s": 5.0, "exit_code": 0}, {"exit_code": 1, "error": "oom"}])
    assert failed["error"] == "oom" and failed["exit_code"] == 1

    for r in res:
        r["peak_memory_mib"], r["mfu"] = r["peak_rss_mib"], 0.5
    meta = {"device": "cpu", "ratios": [{"pair": "same packing off", "tokens_per_s_ratio_runs": run_ratios(f, t)}]}
    row = suite_rows("sft-lora", {"meta": meta, "results": res})[0]
    assert row["ratio"] == pytest.approx(2.0) and row["ratio_runs"] == pytest.approx([2.0, 1.8, 3.0])
    assert "2.00x (1.80-3.00)" in table([row], markdown=True)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_child_peak_rss_is_its_own_not_the_parents(tmp_path):
    """Linux carries a process's peak RSS over fork and exec, so wait4 alone would report at least this (large)
    process's peak for a small child; run_child reports the child's own (~60 MB here)."""
    from scripts.bench.machine import peak_rss, run_child

    ballast = bytearray(800 * 2**20)  # this process: >= 800 MiB resident
    ballast[::4096] = b"x" * len(ballast[::4096])
    child = [sys.executable, "-c", "import time; b = bytearray(60 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
                                   "time.sleep(1.2)"]
    res = run_child(child, dict(os.environ), tmp_path / "log", tmp_path)
    assert res["exit_code"] == 0
    assert 60 <= res["peak_rss_mib"] < 300, res
    assert "lower bound" in res["peak_rss_note"]
    del ballast
    assert peak_rss(5000.0, 1000.0, 4800.0) == (5000.0, None)  # above the parent's peak: wait4 is exact
    assert peak_rss(1000.0, 1000.0, 70.0)[0] == 70.0


@pytest.mark.slow
def test_gpu_check_script_runs_its_steps_on_a_cpu(tmp_path):
    """scripts/gpu_check.sh with GPU_CHECK_DEVICE=cpu: every step runs (tiny models), the short runs' losses fall, and
    OUT holds only the few files a results-limited transfer brings back. The tiny runs go side by side, as on a GPU."""
    import ast
    import os
    import subprocess

    data = Path(os.environ.get("FTUNE_DATA_DIR", "/nonexistent"))
    if not (data / "gsm8k" / "train.jsonl").is_file():  # the script trains on GSM8K, offline
        pytest.skip("needs GSM8K: FTUNE_DATA_DIR=DIR with DIR/gsm8k/train.jsonl (make test-slow passes ../shared/data)")
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "PY": sys.executable, "GPU_CHECK_WORK": str(tmp_path / "work"),
           "GPU_CHECK_PARALLEL": "1"}
    for part in ("core", "qlora", "attention"):
        r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out), part], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    statuses = [line.split()[1] for line in summary.splitlines() if line.strip().startswith("exit ")]
    assert len(statuses) == 8 and set(statuses) == {"0"}, summary
    # the attention part: both ways of attending over packed rows train the same (one line each, equal mean losses)
    attention = {line.split()[1]: line.split() for line in summary.splitlines() if line.startswith("attention ")}
    assert set(attention) == {"per_example", "masked"}, summary
    loss = {how: float(words[words.index("loss") + 1]) for how, words in attention.items()}
    assert loss["per_example"] == pytest.approx(loss["masked"], rel=1e-4), loss
    losses = {line.split()[0]: ast.literal_eval(line.split(" losses ")[1])
              for line in summary.splitlines() if " losses " in line}
    assert set(losses) >= {"bf16", "compile", "ckpt", "qlora", "qlora-big"}
    for name in ("bf16", "compile", "ckpt", "qlora"):
        assert len(losses[name]) == 6 and losses[name][-1] < losses[name][0], (name, losses[name])
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "env.txt", "logs.tar.gz", "summary.txt"]
    assert "| sft-lora | ftune packed |" in (out / "bench.md").read_text()


def test_ftune_overrides_and_trls_allocator_reach_the_children(monkeypatch, tmp_path):
    """--ftune-override lands in every ftune command line; --trl-malloc reuse gives TRL's process glibc tunables equal
    to the thresholds ftune's trainer.cpu_malloc=reuse sets with mallopt; by default TRL's environment is left alone."""
    from ftune.training import cpu_malloc

    eng = _engine()
    a = eng.parse_args(["--ftune-override", "trainer.cpu_malloc=system", "--ftune-override", "trainer.compile=true",
                        "--model-dir", str(tmp_path), "--random-order"])
    ov = eng.ftune_overrides(a, False, "fp32", tmp_path / "out")
    assert ov[-2:] == ["trainer.cpu_malloc=system", "trainer.compile=true"]
    from scripts.bench.settings import TRL_REUSE_TUNABLES

    tunables = dict(kv.split("=") for kv in TRL_REUSE_TUNABLES.split(":"))
    assert int(tunables["glibc.malloc.mmap_threshold"]) == int(tunables["glibc.malloc.trim_threshold"]) \
        == cpu_malloc._INT_MAX

    seen = []

    def fake_child(cmd, env, log_path, cwd, **kw):
        seen.append(env.get("GLIBC_TUNABLES"))
        return {"exit_code": 1, "progress_wall": None, "progress_cpu": None}

    monkeypatch.setattr(eng.trl_side, "run_child", fake_child)
    monkeypatch.setattr(eng.trl_side, "tail", lambda p: "")
    for choice in ("system", "reuse"):
        a.trl_malloc = choice
        eng.bench_trl(a, True, "fp32", {"PATH": "/bin"}, tmp_path, tmp_path)
    assert seen == [None, TRL_REUSE_TUNABLES]


def test_slim_wheel_keeps_the_cpu_and_matching_libraries_and_their_record(tmp_path):
    """scripts/slim_wheel.py (make device-pack's bitsandbytes wheel): libraries matching neither the pattern nor _cpu
    go, with their RECORD lines; every other file stays byte for byte."""
    import zipfile

    sys.path.insert(0, str(REPO / "scripts"))
    from slim_wheel import slim

    files = {"pkg/__init__.py": b"x = 1\n", "pkg/libpkg_cpu.so": b"cpu", "pkg/libpkg_cuda130.so": b"c130",
             "pkg/libpkg_cuda128.so": b"c128", "pkg/libpkg_rocm64.so": b"rocm", "pkg/data/notlib.so": b"keep"}
    record = "".join(f"{name},sha256=x,{len(data)}\n" for name, data in files.items()) + "pkg-1.dist-info/RECORD,,\n"
    wheel = tmp_path / "pkg-1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("pkg-1.dist-info/RECORD", record)
    assert sorted(slim(wheel, "cuda13")) == ["pkg/libpkg_cuda128.so", "pkg/libpkg_rocm64.so"]
    with zipfile.ZipFile(wheel) as z:
        kept = {name: z.read(name) for name in z.namelist()}
    so = {"pkg/libpkg_cpu.so", "pkg/libpkg_cuda130.so", "pkg/data/notlib.so"}
    assert {n for n in kept if n.endswith(".so")} == so
    assert all(kept[n] == files[n] for n in kept if n in files)
    lines = kept["pkg-1.dist-info/RECORD"].decode().splitlines()
    assert [line.split(",")[0] for line in lines] == [n for n in files if n in kept] + ["pkg-1.dist-info/RECORD"]
