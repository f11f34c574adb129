"""Writes a CPU benchmark result as JSON, a markdown table and a plot."""
from __future__ import annotations

import json
from pathlib import Path

TABLE_COLUMNS = ("layer", "B", "T", "implementation", "median", "min", "max", "runs", "vs {baseline}", "vs ggml", "sys",
                 "rms err o", "rms err state", "worst vs any", "checked", "note")


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def _err(x) -> str:
    return "-" if x is None else f"{x:.1e}"


def markdown(doc: dict) -> str:
    m = doc["machine"]
    v = m["versions"]
    blas = ", ".join(f"{b['internal_api']} {b['version']} ({b['architecture']}, {b['num_threads']} threads)"
                     for b in m["blas"] if b.get("user_api") == "blas") or "unknown"
    lines = [
        f"# dnir CPU benchmark ({doc['mode']})", "",
        f"- date: {m['date']}; host: {m['host']}; CPU: {m['cpu']}, {m['cores']} cores; "
        f"{m['threads']} thread(s) per library; memory available at start: {m['memory_available_gib']} GiB",
        f"- load average at start / end: {m['load_average_start']} / {m['load_average_end']} "
        f"(the machine is shared: other processes compete for the cores)",
        f"- versions: dnir {v['dnir']} ({m['dnir_commit']}), numpy {v['numpy']}, torch {v['torch']}, "
        f"tvm {v['tvm']}, flash-linear-attention (fla-core) {v['fla']}, ggml {v.get('ggml', '-')}, "
        f"Python {m['python']}",
        f"- NumPy's BLAS: {blas}; environment: "
        + ", ".join(f"{k}={val if val is not None else '(unset)'}" for k, val in m["blas_env"].items()),
        f"- float32, inputs as dnir.models.random_inputs (seed {doc['settings']['seed']}), with an initial "
        f"state and the final state returned; time per call, median of the timed runs after a warm-up "
        f"call; total wall time {m['wall_s']} s",
        f"- errors: {doc['settings']['metric']} of o and of the final state, every implementation "
        f"against every other in the same run; `checked` = all within {doc['settings']['tolerance']:g}",
        "- `sys`: share of the timed calls' CPU time spent in the kernel, mostly page faults on freshly "
        "allocated memory (expensive on this virtual machine)", "",
    ]
    for kind, title in (("prefill", "Prefill (chunked), B=1"), ("decode", "Decode (T=1)")):
        rows = [c for c in doc["cases"] if c["kind"] == kind]
        if not rows:
            continue
        baseline = rows[0]["baseline"]
        lines += [f"## {title}", "", f"Ratios and errors against `{baseline}`; `vs ggml`: against ggml's fused "
                  f"op (`ggml-gated-delta-net`, llama.cpp's default path).", ""]
        header = [c.format(baseline=baseline) for c in TABLE_COLUMNS]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for case in rows:
            layer = f"{case['preset']} ({case['variant']}, H={case['H']}, HV={case['HV']}, K=V={case['K']})"
            for r in case["results"]:
                lines.append("| " + " | ".join(_row(layer, case, r)) + " |")
        lines.append("")
    if doc["targets"]:
        lines += ["## Targets", "", "| target | variant | T | measured ratio | limit | met | factor to go |",
                  "|---|---|---|---|---|---|---|"]
        for t in doc["targets"]:
            to_go = "-" if t["met"] else f"{t['factor_to_go']:.1f}x"
            lines.append(f"| {t['target']} | {t['variant']} | {t['T']} | {t['ratio']:.2f}x | {t['limit']}x | "
                         f"{'yes' if t['met'] else 'no'} | {to_go} |")
        lines.append("")
        lines += [_missed(t, doc["profiles"]) for t in doc["targets"] if not t["met"]] + [""]
    for p in doc["profiles"]:
        lines += [f"## Where dnir O2 on NumPy spends its time: {p['case']}", "",
                  f"One instrumented run ({fmt_time(p['total_s'])}, of which {fmt_time(p['system_s'])} in the "
                  f"kernel: page faults on fresh memory, charged to the op that first writes it); "
                  f"nodes inside the scan over chunks are "
                  f"summed over all chunks (`%S/%n` is node %n of the body of scan %S, as `dnir opt --dump-dir` "
                  f"prints it).", "", "| op | time | share | nodes |", "|---|---|---|---|"]
        total = sum(o["seconds"] for o in p["by_op"]) or 1.0
        for o in p["by_op"][:10]:
            lines.append(f"| {o['op']} | {fmt_time(o['seconds'])} | {100 * o['seconds'] / total:.0f}% | "
                         f"{o['nodes']} |")
        lines += ["", "| node | op | shape | time | calls |", "|---|---|---|---|---|"]
        for n in p["top_nodes"]:
            lines.append(f"| {n['node']} | {n['op']} | {n['shape']} | {fmt_time(n['seconds'])} | {n['calls']} |")
        lines.append("")
    return "\n".join(lines)


def _missed(t: dict, profiles: list[dict]) -> str:
    """One sentence per missed target: by how much, and where the time goes."""
    text = (f"- {t['variant']} T={t['T']}: `{t['target']}` missed: measured {t['ratio']:.2f}x, "
            f"{t['factor_to_go']:.1f}x too slow.")
    profile = next((p for p in profiles if f"T={t['T']}" in p["case"] and t["variant"] == p.get("variant")), None)
    if profile is not None and "numpy" in t["target"]:
        total = sum(o["seconds"] for o in profile["by_op"]) or 1.0
        ops = ", ".join(f"{o['op']} {100 * o['seconds'] / total:.0f}%" for o in profile["by_op"][:3])
        text += (f" Profile of the O2 graph ({profile['case']}): {ops}; "
                 f"{fmt_time(profile['system_s'])} of {fmt_time(profile['total_s'])} in the kernel.")
    return text


def _row(layer, case, r) -> list[str]:
    if r["status"] != "ok":
        return [layer, str(case["B"]), str(case["T"]), r["impl"]] + ["-"] * 11 + [f"{r['status']}: {r['reason']}"]
    t = r["timing"]
    ratio, vs_ggml = r.get("ratio_vs_baseline"), r.get("ratio_vs_ggml")
    return [layer, str(case["B"]), str(case["T"]), r["impl"], fmt_time(t["median_s"]), fmt_time(t["min_s"]),
            fmt_time(t["max_s"]), str(t["runs"]), "-" if ratio is None else f"{ratio:.2f}x",
            "-" if vs_ggml is None else f"{vs_ggml:.2f}x",
            f"{100 * t['sys_share']:.0f}%",
            _err(r.get("err_o_vs_baseline")), _err(r.get("err_state_vs_baseline")),
            _err(max(r["max_err_o_vs_others"] or 0, r["max_err_state_vs_others"] or 0)),
            "yes" if r["checked"] else "NO", r["note"] + _prepared(r)]


def _prepared(r) -> str:
    """The one-off cost before the first timed call: build, optimise, compile (and load, for TVM);
    for ggml, its graph and tensors with the inputs copied in."""
    text = "" if "prepare_s" not in r else f"; graph prepared in {r['prepare_s']:.1f} s"
    if "compute_buffer_bytes" in r:
        text += f"; ggml compute buffer {r['compute_buffer_bytes'] / 2**20:.0f} MiB"
    return text


def plot(doc: dict, path: Path):
    """Time per call against T (prefill, one panel per layer) and against B (decode)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(c["preset"] for c in doc["cases"]))
    fig, axes = plt.subplots(1, len(presets) + 1, figsize=(6 * (len(presets) + 1), 4.8))
    styles = {}
    for ax, name in zip(axes, presets):
        _lines(ax, [c for c in doc["cases"] if c["preset"] == name and c["kind"] == "prefill"], "T", styles, "-")
        ax.set_title(f"{name}: prefill, B=1")
        ax.set_xlabel("sequence length T")
    ax = axes[-1]
    for name, dash in zip(presets, ("-", "--")):
        _lines(ax, [c for c in doc["cases"] if c["preset"] == name and c["kind"] == "decode"], "B", styles, dash,
               suffix=f" ({name})")
    ax.set_title("decode: T=1")
    ax.set_xlabel("batch B")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_ylabel("time per call (s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"dnir vs peers, float32, {doc['machine']['cpu']}, {doc['machine']['threads']} thread(s), "
                 f"{doc['machine']['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _lines(ax, cases, axis_key, styles, dash, suffix=""):
    impls = list(dict.fromkeys(r["impl"] for c in cases for r in c["results"]))
    for impl in impls:
        points = [(c[axis_key], r["timing"]["median_s"]) for c in cases for r in c["results"]
                  if r["impl"] == impl and r["status"] == "ok"]
        if not points:
            continue
        xs, ys = zip(*sorted(points))
        color = styles.setdefault(impl, f"C{len(styles)}")
        ax.plot(xs, ys, dash, marker="o", color=color, label=impl + suffix)


def write(doc: dict, out_dir: Path) -> dict[str, Path]:
    """cpu.json / cpu.md / cpu.png (cpu-quick.* for --quick, <name>.* for a named subset) under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = doc.get("name") or ("cpu" if doc["mode"] == "full" else "cpu-quick")
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md", "plot": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(doc, indent=1) + "\n")
    paths["markdown"].write_text(markdown(doc) + "\n")
    plot(doc, paths["plot"])
    return paths
