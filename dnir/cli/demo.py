"""dnir demo: the README's main job.

Builds the Qwen3-Next (Gated DeltaNet) and Kimi Linear (Kimi Delta Attention)
layers at their real head sizes, optimises them O0 -> O2 with the pass
manager's per-pass report, runs both graphs on NumPy and TVM-llvm (and on a
Vulkan GPU when there is one), checks them against the float64 recurrent
oracle, and draws the graphs before and after.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from . import non_negative_int

EXAMPLE = """examples:
  dnir demo                     # under two minutes on 2 cores; pictures in ./dnir-demo/
  dnir demo --quick --out /tmp/demo

The layers are built in chunked (prefill) form with chunk size 64, the way
they are written by hand; O2 is the optimising pipeline (`dnir opt --help`).
Times are one warm run each; errors are rms(out - ref) / rms(ref) against the
float64 recurrent form of the delta rule.
"""

LAYERS = {"qwen3-next": "Gated DeltaNet, Qwen3-Next", "kimi-linear": "Kimi Delta Attention, Kimi Linear"}
# Tokens per layer, within two minutes on 2 cores. Kimi Linear's O0 graph holds
# [chunks, heads, 64, 64, 128] decay tensors, 1 GB each at T=1024.
SEQ_LEN = {"qwen3-next": 2048, "kimi-linear": 1024}
# --quick: the same layers with few, small heads (for tests and a first look).
QUICK = {"qwen3-next": dict(heads=2, value_heads=4, head_dim=32, value_dim=32),
         "kimi-linear": dict(heads=2, value_heads=2, head_dim=32, value_dim=32)}
QUICK_SEQ_LEN = 200
LEVELS = ("O0", "O2")


def register(sub):
    p = sub.add_parser("demo", help="build, optimise, run and draw the Qwen3-Next and Kimi Linear layers",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"small heads and T={QUICK_SEQ_LEN} (seconds, not minutes)")
    p.add_argument("--out", default="dnir-demo", help="folder for the pictures and graphs (default ./dnir-demo)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random inputs (>= 0)")
    p.set_defaults(func=run)


@dataclass
class Timing:
    target: str
    level: str
    compile_s: float | None    # None on NumPy (nothing to compile)
    run_s: float
    error: float


def run(args) -> int:
    from dnir.cli import UsageError
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    start = time.perf_counter()
    steady_numpy_timings()
    targets, note = available_targets()
    print(f"dnir demo: two delta-net layers in chunked form (C=64), optimised O0 -> O2, "
          f"run on {', '.join(targets)}")
    print(f"{note}\n" if note else "")
    written = [demo_layer(name, title, QUICK_SEQ_LEN if args.quick else SEQ_LEN[name],
                          QUICK[name] if args.quick else {}, targets, out, args.seed)
               for name, title in LAYERS.items()]
    print(f"wrote to {out}/: each layer's graph before and after O2 (.dnir, and collapsed pictures .svg)\n"
          f"and a picture of what O2 changed (.diff.svg: removed red, added green):")
    for paths in written:
        print("  " + "  ".join(p.name for p in paths))
    print(f"\ndone in {time.perf_counter() - start:.0f} s")
    return 0


def steady_numpy_timings():
    """Every NumPy op allocates its result afresh. By default glibc hands each large block
    back to the kernel when it is freed, and NumPy asks for transparent huge pages, so
    every op page-faults its output in again; on a virtual machine that can cost more
    than the arithmetic, and varies from run to run (kimi-linear O0 at T=2048 on NumPy:
    86 s before, 44 s after, on a 2-core VM). Keep freed memory in the process and use
    plain pages (as NUMPY_MADVISE_HUGEPAGE=0 and MALLOC_MMAP_MAX_=0 would at start-up)."""
    import ctypes
    import sys

    import numpy as np
    core = getattr(np, "_core", None) or np.core
    getattr(core.multiarray, "_set_madvise_hugepage", lambda enabled: None)(False)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:      # not glibc (musl): nothing to tune
            return
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4     # glibc's mallopt parameters (malloc.h)


def available_targets() -> tuple[list[str], str]:
    """NumPy and TVM-llvm always; Vulkan on a GPU adapter. Lavapipe (Mesa's Vulkan on the
    CPU) is left out: it is a conformance device, far slower than llvm on the same cores."""
    from dnir.errors import BackendError
    try:
        from dnir.lowering.vulkan import adapter_info
        info = adapter_info()
    except BackendError:
        return ["numpy", "llvm"], "vulkan: skipped, no Vulkan adapter"
    if info.get("adapter_type") == "CPU":
        return ["numpy", "llvm"], (f"vulkan: skipped, the only adapter is {info.get('device', '')!r} on the CPU "
                                   f"(`dnir run FILE --target vulkan` uses it)")
    return ["numpy", "llvm", "vulkan"], ""


def demo_layer(name, title, seq_len, sizes, targets, out: Path, seed) -> list[Path]:
    from dnir.models import build_delta_net, preset
    from dnir.passes import run_pipeline
    cfg = preset(name, seq_len=seq_len, **sizes)
    before = build_delta_net(cfg)
    after, records = run_pipeline(before, "O2")
    print(f"== {name} ({title}): B={cfg.batch} T={cfg.seq_len} H={cfg.heads} HV={cfg.value_heads} "
          f"K={cfg.head_dim} V={cfg.value_dim} ==\n")
    print(pass_table(records) + "\n")
    timings = measure(cfg, {"O0": before, "O2": after}, targets, seed, name)
    print(run_table(timings) + "\n")
    return draw(name, before, after, out)


def pass_table(records) -> str:
    """The pass manager's records: the input, every pass that changed the graph, and a total."""
    rows = [[r.name, r.nodes, f"{r.flops / 1e9:.2f}", _mb(r.peak_bytes), f"{r.seconds * 1e3:.0f}",
             changes(r) if r.name != "input" else ""] for r in records if r.changed or r.name == "input"]
    unchanged = sum(1 for r in records[1:] if not r.changed)
    total = sum(r.seconds for r in records)
    rows.append([f"O2 ({len(records) - 1} passes)", records[-1].nodes, f"{records[-1].flops / 1e9:.2f}",
                 _mb(records[-1].peak_bytes), f"{total * 1e3:.0f}", f"{unchanged} passes changed nothing"])
    return table(["pass", "nodes", "GFLOP", "peak MB", "ms", "changes"], rows, "lrrrrl", footer=True)


def changes(record, most: int = 4) -> str:
    """The largest changes in op counts, e.g. '+74 slice, +25 exp, -16 cont, ... (9 ops)'."""
    if not record.delta:
        return "rewrote nodes, same op counts"
    ordered = sorted(record.delta.items(), key=lambda kv: (-abs(kv[1]), kv[0]))
    text = ", ".join(f"{d:+d} {op}" for op, d in ordered[:most])
    return text if len(ordered) <= most else f"{text}, ... ({len(ordered)} ops)"


def measure(cfg, graphs: dict, targets, seed, name) -> list[Timing]:
    """Run every graph on every target (TVM targets compiled first, then one warm-up
    run and one timed run); errors against the float64 recurrent oracle."""
    from dnir.lowering import run as run_graph
    from dnir.models import delta_rule_reference, random_inputs, relative_rms_error

    from .progress import compile_for, progress
    inputs = random_inputs(cfg, seed)
    steps = [("oracle", None, None)] + [(t, level, g) for t in targets for level, g in graphs.items()]
    timings, ref = [], None
    with progress(total=len(steps), desc=name, unit="run") as bar:
        for target, level, graph in steps:
            bar.set_description(f"{name}: {target}{' ' + level if level else ' float64 reference'}")
            if target == "oracle":
                ref, _ = delta_rule_reference(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"],
                                              scale=cfg.scale, l2norm=cfg.l2norm)
            else:
                compile_s = None
                if target != "numpy":
                    bar.set_description(f"{name}: compiling {level} for {target}")
                    compile_s = _seconds(lambda: compile_for(graph, target))
                    run_graph(graph, inputs, target=target)   # warm-up: loads the code, touches the memory
                    bar.set_description(f"{name}: {target} {level}")
                start = time.perf_counter()
                (o,) = run_graph(graph, inputs, target=target)
                run_s = time.perf_counter() - start
                timings.append(Timing(target, level, compile_s, run_s, relative_rms_error(o, ref)))
            bar.update()
    return timings


def run_table(timings: list[Timing]) -> str:
    base = {t.target: t.run_s for t in timings if t.level == "O0"}
    numpy_o0 = base["numpy"]
    rows = [[t.target, t.level, "-" if t.compile_s is None else f"{t.compile_s:.1f}", f"{t.run_s * 1e3:.0f}",
             f"{base[t.target] / t.run_s:.1f}x", f"{numpy_o0 / t.run_s:.1f}x", f"{t.error:.1e}"]
            for t in timings]
    return table(["target", "graph", "compile s", "run ms", "vs O0", "vs numpy O0", "error vs oracle"],
                 rows, "llrrrrr")


def draw(name, before, after, out: Path) -> list[Path]:
    """Collapsed pictures of both graphs and of their diff; .dot files when Graphviz is missing."""
    from dnir import viz
    from dnir.errors import DnirError
    from dnir.text import print_graph

    from . import render_picture, write_text
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for level, graph in (("O0", before), ("O2", after)):
        path = out / f"{name}.{level}.dnir"
        write_text(path, print_graph(graph))
        written.append(path)
    pictures = {f"{name}.O0.svg": viz.to_dot(before, collapse=True),
                f"{name}.O2.svg": viz.to_dot(after, collapse=True),
                f"{name}.diff.svg": viz.diff_dot(before, after, collapse=True)}
    for file, dot in pictures.items():
        try:
            written.append(render_picture(dot, out / file))
        except DnirError as e:   # no Graphviz `dot`: render wrote the .dot file and says how to draw it
            print(f"note: {e}")
            written.append((out / file).with_suffix(".dot"))
    return written


def table(headers, rows, align: str, footer: bool = False) -> str:
    """A plain-text table; align is one 'l' or 'r' per column; footer rules off the last row."""
    cells = [[str(c) for c in row] for row in [headers] + rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)).rstrip()
    rule = "  ".join("-" * w for w in widths)
    lines = [line(cells[0]), rule] + [line(r) for r in cells[1:]]
    if footer:
        lines.insert(-1, rule)
    return "\n".join(lines)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _mb(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"
