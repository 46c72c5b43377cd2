"""The report of scripts/bench_train.py: FLOPs per token, ftune/TRL ratios, and the side-by-side table."""

from __future__ import annotations

from .settings import GPU_TARGET, TARGET


def flops_per_token(params: dict, objective: str = "sft", peft: str = "lora",
                    context: float = 0.0) -> tuple[float, str]:
    """Model FLOPs per useful token: the weights' products, plus attention's when `context` (attention_context) is
    given: the scores and their product with the values, causal (half the T x T matrix, as FlashAttention counts),
    forward 2*L*A*T (L layers, A = heads x head size), training 3x that (both operands of each product get a gradient,
    also under LoRA), the reference model of DPO once more forward."""
    n, n_lora = params["base"], params["lora"]
    if peft == "full":
        if objective == "dpo":
            fpt, text = 8 * n, (f"DPO, full fine-tuning: 8*N = 8*{n / 1e6:.1f}M FLOPs per useful token (policy 6N: "
                                f"forward 2N, activation and weight gradients 4N; frozen reference copy forward 2N)")
        else:
            fpt, text = 6 * n, (f"full fine-tuning: 6*N = 6*{n / 1e6:.1f}M FLOPs per useful token (forward 2N, "
                                f"activation and weight gradients 4N). N counts every parameter once (a tied "
                                f"embedding as the LM-head matmul)")
    elif objective == "dpo":
        fpt, text = 6 * n + 6 * n_lora, (f"DPO with LoRA: 6*N_base + 6*N_lora = 6*{n / 1e6:.1f}M + "
                                         f"6*{n_lora / 1e6:.2f}M FLOPs per useful token (policy 2N forward + 2N "
                                         f"activation gradients + 6*N_lora for the adapter, reference forward 2N "
                                         f"with the adapter disabled)")
    else:
        fpt, text = 4 * n + 6 * n_lora, (f"LoRA: 4*N_base + 6*N_lora = 4*{n / 1e6:.1f}M + 6*{n_lora / 1e6:.2f}M "
                                         f"FLOPs per useful token (2N forward + 2N activation gradients; no weight "
                                         f"gradients for the frozen base; full fine-tuning would be 6N). N counts "
                                         f"every base parameter once (the tied embedding as the LM-head matmul)")
    if not context:
        return fpt, text + "; attention score FLOPs are left out"
    c, layers, width = (8 if objective == "dpo" else 6), params["layers"], params["attention_width"]
    attn = c * layers * width * context
    return fpt + attn, (text + f"; plus causal attention {c}*L*A*T = {c}*{layers}*{width}*{context:.1f} = "
                        f"{attn / 1e6:.1f}M (T = sum T^2 / sum T over the benchmark's training sequences; "
                        f"{'policy 6, reference forward 2' if c == 8 else 'forward 2, gradients 4'})")


def run_ratios(f: dict, t: dict) -> list[float] | None:
    """ftune / TRL tokens/s of each repeat (the k-th ftune run against the k-th TRL run), with --repeats > 1."""
    fr, tr = f.get("repeats") or [], t.get("repeats") or []
    if len(fr) < 2 or len(fr) != len(tr) or not all(x.get("tokens_per_s") for x in fr + tr):
        return None
    return [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(fr, tr)]


def fmt(x, spec=",.0f"):
    return "-" if x is None else format(x, spec)


def report(results: list[dict], meta: dict) -> str:
    ok = [r for r in results if r.get("exit_code") == 0 and r.get("tokens_per_s")]
    peak = meta["matmul_peak_gflops"][meta["precision"]]
    fpt = meta["flops_per_token"]
    gpu = meta.get("device") == "cuda"
    for r in results:  # what the ratios compare: GPU memory on a GPU, resident memory on a CPU
        r["peak_memory_mib"] = r.get("peak_gpu_mib") if gpu else r.get("peak_rss_mib")
    shape_peak = (meta.get("shape_matmul_gflops") or {}).get(meta["precision"])
    for r in ok:
        r["mfu"] = r["tokens_per_s"] * fpt / (peak * 1e9)
        if shape_peak:
            r["shape_mfu"] = r["tokens_per_s"] * fpt / (shape_peak * 1e9)
    cols = [f"{r['framework']} {'pack' if r['packing'] else 'no-pack'}"
            + (f" x{r['nproc']}" if r.get("nproc", 1) > 1 else "") for r in results]
    rows = [
        ("useful tokens/s (steady)", [fmt(r.get("tokens_per_s"), ",.1f") for r in results]),
        ("peak RSS (MiB)", [fmt(r.get("peak_rss_mib")) for r in results]),
        *([("peak GPU memory (MiB, nvidia-smi)", [fmt(r.get("peak_gpu_mib")) for r in results])] if gpu else []),
        (f"MFU vs {meta['precision']} matmul peak", [fmt(r.get("mfu") and 100 * r["mfu"], ".2f") + "%"
                                                      if r.get("mfu") else "-" for r in results]),
        *([("MFU vs the model's own matmul shapes", [fmt(r.get("shape_mfu") and 100 * r["shape_mfu"], ".2f") + "%"
                                                       if r.get("shape_mfu") else "-" for r in results])]
          if shape_peak else []),
        *([("useful tokens/s, each run (ABBA order)", [", ".join(fmt(x.get("tokens_per_s"), ".1f")
                                                                 for x in r.get("repeats", [r])) for r in results])]
          if any(r.get("repeats") for r in results) else []),
        ("useful tokens per CPU-second", [fmt(r.get("tokens_per_cpu_s"), ",.1f") for r in results]),
        ("timed steps / seconds", [f"{r.get('steps_timed', '-')} / {fmt(r.get('seconds_timed'), '.1f')}"
                                   for r in results]),
        ("widest row seen (tokens)", [fmt(r.get("widest_row")) for r in results]),
        ("other processes' CPU (cores, avg)", [fmt(r.get("other_cpu_cores"), ".2f") for r in results]),
        ("load avg (1 min) before/after", [f"{fmt(r.get('load_1min_before'), '.1f')}/"
                                           f"{fmt(r.get('load_1min_after'), '.1f')}" for r in results]),
        ("useful tokens (all steps)", [fmt(r.get("useful_tokens")) for r in results]),
        ("padded tokens (all steps)", [fmt(r.get("padded_tokens")) for r in results]),
        ("loss tokens (all steps)", [fmt(r.get("loss_tokens")) for r in results]),
        ("train loss: last step / mean", [f"{fmt(r.get('final_loss'), '.3f')} / {fmt(r.get('mean_loss'), '.3f')}"
                                          for r in results]),
        ("process wall s", [fmt(r.get("process_wall_s"), ".0f") for r in results]),
    ]
    w0 = max(len(k) for k, _ in rows)
    ws = [max(len(c), *(len(v[i]) for _, v in rows)) for i, c in enumerate(cols)]
    lines = [f"{'':{w0}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cols, ws))]
    lines += [f"{k:{w0}}  " + "  ".join(f"{x:>{w}}" for x, w in zip(v, ws)) for k, v in rows]
    by = {(r["framework"], r["packing"]): r for r in ok}
    target = GPU_TARGET if gpu else TARGET[meta["objective"]]
    mem_name = "peak GPU memory" if gpu else "peak RSS"
    ratios = []
    pairs = [("same packing off", (False, False)), ("same packing on", (True, True)),
             ("ftune packed vs TRL default (no packing)", (True, False))]
    for label, (fp, tp) in pairs:
        f, t = by.get(("ftune", fp)), by.get(("trl", tp))
        if f and t:
            speed = f["tokens_per_s"] / t["tokens_per_s"]
            mem = (f["peak_memory_mib"] / t["peak_memory_mib"] if f["peak_memory_mib"] and t["peak_memory_mib"]
                   else float("nan"))
            runs = run_ratios(f, t)
            ratios.append({"pair": label, "tokens_per_s_ratio": speed, "tokens_per_s_ratio_runs": runs,
                           "peak_memory_ratio": mem, "peak_memory_kind": mem_name,
                           "meets_target": speed >= target and mem <= 1.0})
            verdict = "met" if speed >= target and mem <= 1.0 else "NOT met"
            each = f" (each run: {', '.join(f'x{x:.2f}' for x in runs)})" if runs else ""
            lines.append(f"ftune/TRL, {label}: tokens/s x{speed:.2f}{each}, {mem_name} x{mem:.2f} -> target "
                         f"(>={target}x tokens/s at <= TRL's {mem_name}) {verdict}")
    meta["ratios"] = ratios
    lines.append(f"matmul peak ({meta['matmul_n']}^3, best of {meta['matmul_repeats']} at start and at end): "
                 + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in meta["matmul_peak_gflops"].items())
                 + f"; MFU uses the {meta['precision']} figure")
    if meta.get("shape_matmul_gflops"):
        lines.append(f"matmul rate at the model's own shapes ({meta['shape_matmul_rows']} rows: each projection "
                     f"forward and backward, weighted by its FLOPs): "
                     + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in meta["shape_matmul_gflops"].items())
                     + "; the roof a step could reach if nothing but these products took time")
    lines.append(f"MFU formula: {meta['flops_formula']}")
    lines.append(f"tokens/s: real (non-padding) tokens of steps {meta['warmup_steps'] + 1}..{meta['steps']} over "
                 f"their wall time; the first {meta['warmup_steps']} step(s) are warm-up and left out. Per CPU-second: "
                 f"the same tokens over the process's user+system CPU time in those steps (less sensitive to other "
                 f"load on the machine). Padding-free TRL batches are one flattened row.")
    for r in results:
        if r.get("peak_rss_note"):
            lines.append(f"peak RSS ({r['framework']}, packing={r['packing']}): {r['peak_rss_note']}")
        if r.get("note"):
            lines.append(f"note ({r['framework']}, packing={r['packing']}): {r['note']}")
    return "\n".join(lines)
