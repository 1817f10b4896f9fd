"""Writes a benchmark run: ``results.json`` (everything, raw), ``report.md`` (tables) and PNG plots.

The run is a plain dict built by the runner (``benchmarks/__main__.py``)::

    {"mode", "device", "command", "started", "elapsed_s", "machine", "ceilings", "modules": [
        {"key", "module", "status": "ok" | "failed" | "skipped", "elapsed_s", "error", "traceback",
         "result": BenchResult | None}, ...]}

``write_report`` renders the plots first (so the report can link them), then the JSON and the markdown.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import BenchResult, Plot, SkipBenchmark, Table, Timing, fmt_timing

#: Seconds the whole quick suite may take on 2 CPU cores (issue 7), and one module in quick mode.
QUICK_BUDGET_S = 300.0
QUICK_MODULE_BUDGET_S = 60.0


# --------------------------------------------------------------------------------------------- JSON


def to_jsonable(obj: Any) -> Any:
    """Convert results to strict JSON types: dataclasses, tensors, NumPy values, dtypes, paths.

    Non-finite floats become ``None`` (strict JSON has no NaN/Infinity); unknown objects become ``str``.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Timing):
        return obj.as_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    tolist = getattr(obj, "tolist", None)  # NumPy arrays/scalars, torch tensors
    if callable(tolist) and type(obj).__module__.split(".")[0] in ("numpy", "torch"):
        try:
            return to_jsonable(tolist())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(obj)


# ----------------------------------------------------------------------------------------- markdown


def fmt_cell(value: Any) -> str:
    """One table cell as markdown text: numbers to 4 significant digits, timings with their spread."""
    if value is None:
        return "-"
    if isinstance(value, Timing):
        text = fmt_timing(value)
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            text = str(value)
        elif value == 0 or 1e-3 <= abs(value) < 1e5:
            text = f"{value:.4g}"
        else:
            text = f"{value:.3e}"
    else:
        item = getattr(value, "item", None)
        if callable(item) and type(value).__module__.split(".")[0] in ("numpy", "torch"):
            try:
                return fmt_cell(item())
            except (TypeError, ValueError, RuntimeError):
                pass
        text = str(value)
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def markdown_table(table: Table) -> str:
    """A ``Table`` as a titled GitHub markdown table, followed by its notes."""
    lines = [f"#### {table.title}", ""]
    columns = [fmt_cell(c) for c in table.columns]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in table.rows:
        cells = [fmt_cell(c) for c in row]
        cells += [""] * (len(columns) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    if not table.rows:
        lines.append("| " + " | ".join(["(no rows)"] + [""] * (len(columns) - 1)) + " |")
    for note in table.notes:
        lines += ["", f"*{note}*"]
    return "\n".join(lines)


def markdown_tables(result: BenchResult) -> str:
    """All tables and notes of one result as markdown (what a module's ``__main__`` prints)."""
    parts = [f"## {result.name}"]
    parts += [f"- {note}" for note in result.notes]
    parts += [markdown_table(table) for table in result.tables]
    return "\n\n".join(parts) + "\n"


def standalone_main(run: Callable[..., BenchResult], description: str | None = None) -> None:
    """The command line of one benchmark module: ``python -m benchmarks.bench_x [--full] [--device D]``.

    Runs the module once (quick unless ``--full``; ``--device auto`` is CUDA when available) and prints
    its tables as markdown. The suite runner (``python -m benchmarks``) is the way to get files and plots.
    """
    import argparse

    import torch

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--full", action="store_true", help="the full sizes (default: quick)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    args = parser.parse_args()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        result = run(quick=not args.full, device=device)
    except SkipBenchmark as skip:
        print(f"skipped: {skip}")
        return
    print(markdown_tables(result))


def _machine_lines(machine: dict[str, Any], ceilings: dict[str, Any] | None) -> list[str]:
    versions = machine.get("versions", {})
    git = machine.get("lowrank_git", {})
    commit = git.get("commit") or "unknown"
    rev = commit[:12] + (" (with uncommitted changes)" if git.get("dirty") else "")
    gpus = machine.get("gpus") or []
    gpu_text = (
        "; ".join(
            f"{g['name']} ({g['memory_gib']} GiB, sm_{g['compute_capability'].replace('.', '')}, "
            f"{g['multiprocessors']} SMs)"
            for g in gpus
        )
        or "none"
    )
    if gpus:
        gpu_text += f"; CUDA runtime {machine.get('cuda_runtime')}, driver {machine.get('cuda_driver')}"
    blas = ", ".join(
        f"{b.get('internal_api')} {b.get('version', '')} x{b.get('num_threads')}".replace("  ", " ")
        for b in machine.get("blas", [])
    )
    rows = [
        ("Date (UTC)", machine.get("date")),
        ("CPU", machine.get("cpu_model")),
        (
            "Threads",
            f"{machine.get('cpus_usable')} usable of {machine.get('cpu_count')} logical CPUs; "
            f"torch {machine.get('torch_threads')} intra-op / "
            f"{machine.get('torch_interop_threads')} inter-op",
        ),
        ("Memory", f"{machine.get('memory_gib')} GiB"),
        ("GPU", gpu_text),
        ("OS / Python", f"{machine.get('os')} / {machine.get('python')}"),
        ("BLAS", f"torch: {machine.get('torch_blas')}; NumPy/SciPy: {blas or 'unknown'}"),
        (
            "Versions",
            ", ".join(f"{name} {ver}" for name, ver in versions.items() if ver is not None)
            + (
                "; not installed: " + ", ".join(n for n, v in versions.items() if v is None)
                if any(v is None for v in versions.values())
                else ""
            ),
        ),
        ("lowrank revision", rev),
    ]
    if ceilings:
        flops = ", ".join(f"{k} {v:.3g}" for k, v in ceilings.get("matmul_TFLOPs", {}).items())
        rows.append(
            (
                f"Measured ceilings ({ceilings.get('device')})",
                f"copy bandwidth {ceilings.get('memory_GBps', float('nan')):.1f} GB/s (read+write, "
                f"{ceilings.get('copy_MiB')} MiB); matmul n={ceilings.get('matmul_n')} TFLOP/s: {flops}",
            )
        )
    lines = ["| | |", "|---|---|"]
    lines += [f"| {name} | {fmt_cell(value)} |" for name, value in rows]
    return lines


def render_markdown(run: dict[str, Any], plot_paths: dict[int, list[tuple[Plot, str | None, str]]]) -> str:
    """The full ``report.md`` text; ``plot_paths[i]`` lists (plot, relative PNG path or None, note)."""
    modules = run["modules"]
    lines = [
        "# lowrank benchmark report",
        "",
        f"Mode **{run['mode']}** on device **{run['device']}**, started {run.get('started')}, "
        f"{run.get('elapsed_s', 0.0):.1f} s in all. Command: `{run.get('command')}`.",
        "",
        "Timings are the median of several interleaved repeats after warm-up, with the spread (min-max); "
        "alternatives run in the same process on the same inputs. Raw numbers: `results.json`.",
        "",
        "## Machine",
        "",
    ]
    lines += _machine_lines(run.get("machine", {}), run.get("ceilings"))
    lines += ["", "## Summary", "", "| module | status | elapsed | note |", "|---|---|---|---|"]
    for entry in modules:
        note = entry.get("error") or ""
        if (
            run["mode"] == "quick"
            and entry.get("elapsed_s", 0.0) > QUICK_MODULE_BUDGET_S
            and entry["status"] == "ok"
        ):
            note = f"over the {QUICK_MODULE_BUDGET_S:.0f} s quick budget of one module"
        lines.append(
            f"| [{entry['key']}](#{_anchor(entry['key'])}) | {entry['status']} | "
            f"{entry.get('elapsed_s', 0.0):.1f} s | {fmt_cell(note)} |"
        )
    total = run.get("elapsed_s", 0.0)
    if run["mode"] == "quick":
        verdict = "within" if total <= QUICK_BUDGET_S else "OVER"
        lines += ["", f"Total {total:.1f} s: {verdict} the {QUICK_BUDGET_S:.0f} s budget of the quick suite."]
    for index, entry in enumerate(modules):
        lines += ["", f"## {entry['key']}", ""]
        result: BenchResult | None = entry.get("result")
        title = result.name if result is not None else entry["module"]
        lines.append(
            f"`{entry['module']}` ({title}): **{entry['status']}** in {entry.get('elapsed_s', 0):.1f} s."
        )
        if entry["status"] == "skipped":
            lines += ["", f"Skipped: {entry.get('error')}"]
        elif entry["status"] == "failed":
            lines += ["", f"Failed: `{fmt_cell(entry.get('error'))}`", "", "```"]
            lines += (entry.get("traceback") or "").rstrip().splitlines()[-30:]
            lines += ["```"]
        if result is None:
            continue
        try:
            lines += _result_lines(result, plot_paths.get(index, []))
        except Exception as exc:  # one malformed result must not cost the rest of the report
            lines += ["", f"*Could not render this result: {fmt_cell(f'{type(exc).__name__}: {exc}')}*"]
    return "\n".join(lines) + "\n"


def _result_lines(result: BenchResult, plots: list[tuple[Plot, str | None, str]]) -> list[str]:
    lines: list[str] = []
    if result.notes:
        lines.append("")
    lines += [f"- {fmt_cell(note)}" for note in result.notes]
    for table in result.tables:
        lines += ["", markdown_table(table)]
    for plot, path, note in plots:
        if path is not None:
            lines += ["", f"![{fmt_cell(plot.title)}]({path})"]
        if note:
            lines += ["", f"*Plot {fmt_cell(plot.title)}: {note}*"]
    return lines


def _anchor(title: str) -> str:
    """GitHub's heading anchor for a heading text."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


# -------------------------------------------------------------------------------------------- plots


def _safe_png_name(name: str) -> str:
    stem = Path(name).name
    stem = stem[:-4] if stem.lower().endswith(".png") else stem
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "plot"
    return stem + ".png"


def render_plot(plot: Plot, path: Path) -> str:
    """Draw ``plot`` to ``path`` (PNG, Agg backend); returns a note ('' when all points were drawn)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dropped = 0
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    try:
        markers = "os^Dv<>pPX*h"
        for i, (label, points) in enumerate(plot.series.items()):
            pts = []
            for point in points:
                x, y = float(point[0]), float(point[1])
                ok = math.isfinite(x) and math.isfinite(y)
                ok = ok and (not plot.logx or x > 0) and (not plot.logy or y > 0)
                if ok:
                    pts.append((x, y))
                else:
                    dropped += 1
            if not pts:
                continue
            xs, ys = zip(*(sorted(pts) if plot.kind != "scatter" else pts))
            if plot.kind == "scatter":
                ax.scatter(xs, ys, label=label, marker=markers[i % len(markers)], s=36)
            else:
                ax.plot(xs, ys, label=label, marker=markers[i % len(markers)], markersize=4)
        plain = matplotlib.ticker.FuncFormatter(lambda value, _pos: f"{value:g}")
        for is_log, axis, scale in (
            (plot.logx, ax.xaxis, ax.set_xscale),
            (plot.logy, ax.yaxis, ax.set_yscale),
        ):
            if is_log:
                scale("log")
                axis.set_major_formatter(plain)
                low, high = axis.get_view_interval()
                few_decades = low > 0 and math.log10(high / low) <= 1.5  # else minor labels would crowd
                axis.set_minor_formatter(plain if few_decades else matplotlib.ticker.NullFormatter())
        ax.set_title(plot.title)
        ax.set_xlabel(plot.xlabel)
        ax.set_ylabel(plot.ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if plot.series:
            ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return f"{dropped} non-finite or non-positive (log axis) points left out" if dropped else ""


def render_plots(run: dict[str, Any], out_dir: Path) -> dict[int, list[tuple[Plot, str | None, str]]]:
    """Draw every module's plots into ``out_dir/plots``; a plot that fails leaves a note, not an error."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        missing = "matplotlib is not installed; plot not drawn"
        return {
            i: [(p, None, missing) for p in e["result"].plots]
            for i, e in enumerate(run["modules"])
            if e.get("result") is not None
        }
    plot_dir = out_dir / "plots"
    used: set[str] = set()
    drawn: dict[int, list[tuple[Plot, str | None, str]]] = {}
    for index, entry in enumerate(run["modules"]):
        result = entry.get("result")
        if result is None:
            continue
        for plot in result.plots:
            name = _safe_png_name(plot.file)
            if name in used:
                name = _safe_png_name(f"{entry['key']}_{plot.file}")
            while name in used:
                name = "x" + name
            used.add(name)
            plot_dir.mkdir(parents=True, exist_ok=True)
            try:
                note = render_plot(plot, plot_dir / name)
                rel: str | None = f"plots/{name}"
            except Exception as exc:  # a bad plot must not lose the rest of the report
                note, rel = f"could not be drawn: {type(exc).__name__}: {exc}", None
            drawn.setdefault(index, []).append((plot, rel, note))
    return drawn


# ------------------------------------------------------------------------------------------- writer


def run_to_json(run: dict[str, Any], plot_paths: dict[int, list[tuple[Plot, str | None, str]]]) -> Any:
    """The whole run as strict-JSON data (plots carry their PNG path and note)."""
    data = to_jsonable({k: v for k, v in run.items() if k != "modules"})
    data["modules"] = []
    for index, entry in enumerate(run["modules"]):
        item = to_jsonable({k: v for k, v in entry.items() if k != "result"})
        result = entry.get("result")
        item["result"] = to_jsonable(result) if result is not None else None
        if result is not None:
            for plot_json, (_, rel, note) in zip(item["result"]["plots"], plot_paths.get(index, [])):
                plot_json["png"] = rel
                plot_json["note"] = note
        data["modules"].append(item)
    return data


def write_report(
    run: dict[str, Any], out_dir: str | os.PathLike[str], *, plots: bool = True
) -> dict[str, Path]:
    """Write ``results.json``, ``report.md`` and (if ``plots``) ``plots/*.png`` under ``out_dir``.

    Files are written to a temporary name and renamed, so a reader never sees half a report.
    Returns the paths written, by kind.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_paths = render_plots(run, out) if plots else {}
    json_text = json.dumps(run_to_json(run, plot_paths), indent=1, allow_nan=False)
    markdown = render_markdown(run, plot_paths)
    written = {"json": out / "results.json", "markdown": out / "report.md"}
    for path, text in ((written["json"], json_text + "\n"), (written["markdown"], markdown)):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return written
