"""The benchmark suite: ``python -m benchmarks [--quick|--full] [--device cpu|cuda|auto] [--only svd,lora]``.

Discovers every ``benchmarks/bench_*.py``, runs each module's ``run(quick=..., device=...)`` in turn and
writes ``results.json``, ``report.md`` and PNG plots to ``--out`` (default ``bench_out/``). A module that
raises is reported (in the report, the JSON and the exit status) and the suite goes on; a module whose
optional dependency is missing, or that raises ``SkipBenchmark``, is skipped with a note. The report is
rewritten after every module, so an interrupted run still leaves what it measured.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.util
import random
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

if __package__ in (None, ""):  # run as a file path: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.common import BenchResult, Plot, SkipBenchmark, Table
from benchmarks.machine import REPO_ROOT, ceilings, device_label, machine_info
from benchmarks.report import write_report

BENCH_DIR = Path(__file__).resolve().parent
#: Run order (headline benchmarks first); modules not listed follow in alphabetical order.
PREFERRED_ORDER = ("lora", "svd", "factorize", "lora_model", "multi", "distributed")
#: Top-level packages whose absence is a bug of this project, never an optional dependency to skip.
OWN_PACKAGES = ("lowrank", "benchmarks")


@dataclass
class BenchModule:
    key: str  # "svd" for bench_svd.py
    path: Path
    package: str | None  # "benchmarks" when importable as benchmarks.bench_<key>


def discover(modules_dir: Path | None = None) -> list[BenchModule]:
    """The ``bench_*.py`` modules of ``modules_dir`` (default: this package), in run order."""
    directory = BENCH_DIR if modules_dir is None else Path(modules_dir)
    package = "benchmarks" if directory.resolve() == BENCH_DIR else None
    found = [
        BenchModule(path.stem.removeprefix("bench_"), path, package)
        for path in directory.glob("bench_*.py")
        if path.is_file()
    ]

    def order(mod: BenchModule) -> tuple[int, str]:
        rank = PREFERRED_ORDER.index(mod.key) if mod.key in PREFERRED_ORDER else len(PREFERRED_ORDER)
        return rank, mod.key

    return sorted(found, key=order)


def load(mod: BenchModule) -> ModuleType:
    """Import a benchmark module (as ``benchmarks.bench_<key>`` when it lives in the package)."""
    if mod.package is not None:
        return importlib.import_module(f"{mod.package}.{mod.path.stem}")
    name = f"_lowrank_bench_{mod.key}"
    spec = importlib.util.spec_from_file_location(name, mod.path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {mod.path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _missing_optional(exc: BaseException) -> str | None:
    """The name of a missing third-party package behind ``exc``, or None if it is not that."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        if exc.name.split(".")[0] not in OWN_PACKAGES:
            return exc.name
    return None


def check_result(result: Any, where: str) -> None:
    """TypeError naming the offending part unless ``result`` is a well-formed ``BenchResult``."""
    if not isinstance(result, BenchResult):
        raise TypeError(f"{where}: run() returned {type(result).__name__}, not BenchResult")
    for i, table in enumerate(result.tables):
        if not isinstance(table, Table):
            raise TypeError(f"{where}: tables[{i}] is {type(table).__name__}, not Table")
        for j, row in enumerate(table.rows):
            if not isinstance(row, (list, tuple)) or len(row) > len(table.columns):
                raise TypeError(
                    f"{where}: table {table.title!r} row {j} must be a list of at most "
                    f"{len(table.columns)} cells (one per column), got {row!r:.200}"
                )
    for i, plot in enumerate(result.plots):
        if not isinstance(plot, Plot):
            raise TypeError(f"{where}: plots[{i}] is {type(plot).__name__}, not Plot")
        for label, points in plot.series.items():
            if any(len(point) != 2 for point in points):
                raise TypeError(f"{where}: plot {plot.title!r} series {label!r} needs (x, y) points")


def run_module(mod: BenchModule, *, quick: bool, device: str) -> dict[str, Any]:
    """Import and run one module; never raises (except KeyboardInterrupt). Returns its run entry."""
    entry: dict[str, Any] = {
        "key": mod.key,
        "module": mod.path.stem if mod.package is None else f"{mod.package}.{mod.path.stem}",
        "status": "ok",
        "elapsed_s": 0.0,
        "error": None,
        "traceback": None,
        "result": None,
    }
    random.seed(0)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    begin = time.perf_counter()
    try:
        module = load(mod)
        run = getattr(module, "run", None)
        if not callable(run):
            raise TypeError(f"{mod.path.name} defines no run(*, quick, device) function")
        result = run(quick=quick, device=device)
        check_result(result, mod.path.name)
        entry["result"] = result
    except SkipBenchmark as exc:
        entry.update(status="skipped", error=str(exc) or "skipped by the module")
    except Exception as exc:
        missing = _missing_optional(exc)
        if missing is not None:
            entry.update(status="skipped", error=f"optional dependency {missing!r} is not installed")
        else:
            entry.update(
                status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()
            )
    finally:
        entry["elapsed_s"] = time.perf_counter() - begin
        torch.set_num_threads(threads)
    return entry


def resolve_device(requested: str) -> str:
    """``auto`` -> ``cuda`` if available else ``cpu``; ``cuda`` without a GPU is a ValueError."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda: no CUDA device is available (torch.cuda.is_available() is False); "
            "use --device cpu or --device auto"
        )
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or auto, got {requested!r}")
    return requested


def select(modules: list[BenchModule], only: str | None) -> list[BenchModule]:
    """The modules named in ``--only`` (``svd,lora`` or ``bench_svd``), keeping the run order."""
    if only is None:
        return modules
    wanted = [name.strip().removeprefix("bench_").removesuffix(".py") for name in only.split(",")]
    wanted = [name for name in wanted if name]
    known = {mod.key for mod in modules}
    unknown = [name for name in wanted if name not in known]
    if unknown or not wanted:
        raise ValueError(
            f"--only: unknown benchmark(s) {', '.join(unknown) or '(none given)'}; "
            f"available: {', '.join(sorted(known)) or '(none)'}"
        )
    return [mod for mod in modules if mod.key in wanted]


def archive_folder(results: Path, label: str, mode: str) -> Path:
    """A new folder ``<date>[b, c, ...]_<label>_<mode>`` under ``results``: a committed archive of the same
    day is never overwritten (a second run that day gets the suffix ``b``, then ``c``, ...). The suffix
    follows the last one that day on this machine in any mode, so the day's folders sort in the order they
    were made (a quick run after ``2026-12-01c_<label>_full`` is ``2026-12-01d_<label>_quick``, not ``b``)."""
    stamp = _dt.date.today().isoformat()
    suffixes = ("", *"bcdefghijklmnopqrstuvwxyz")
    used = [
        i
        for i, suffix in enumerate(suffixes)
        if results.is_dir() and any(results.glob(f"{stamp}{suffix}_{label}_*"))
    ]
    first = max(used) + 1 if used else 0
    for suffix in suffixes[first:]:
        out = results / f"{stamp}{suffix}_{label}_{mode}"
        if not out.exists():
            return out
    raise ValueError(f"--archive: the folders {results}/{stamp}[b-z]_{label}_* are used up; use --out")


def check_out_dir(out: Path) -> None:
    """ValueError naming ``--out`` unless ``out`` is (or can be created as) a writable folder: checked
    before any benchmark runs, so a bad path costs no measurement time."""
    probe = out.resolve()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"--out {str(out)!r}: {str(probe)!r} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise ValueError(f"--out {str(out)!r}: cannot write there ({exc.strerror or exc})") from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run lowrank's benchmarks side by side with the alternatives; write the report.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", dest="quick", action="store_true", default=True, help="small shapes (default)"
    )
    mode.add_argument("--full", dest="quick", action="store_false", help="full shapes and repeats")
    parser.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"], help="default: auto")
    parser.add_argument("--only", default=None, help="comma-separated benchmarks, e.g. svd,lora")
    out_or_archive = parser.add_mutually_exclusive_group()
    out_or_archive.add_argument("--out", default=None, help="output directory (default: bench_out/)")
    out_or_archive.add_argument(
        "--archive",
        action="store_true",
        help="write to a new folder benchmarks/results/<date>[b, c, ...]_<machine>_<mode>/ (to commit) "
        "instead of --out; an existing archive is never overwritten",
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--no-ceilings", action="store_true", help="skip measuring bandwidth/matmul ceilings")
    parser.add_argument("--modules-dir", default=None, help=argparse.SUPPRESS)  # for tests: other bench dir
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; returns 0, 1 if a module failed, 2 for bad arguments, 130 when interrupted."""
    args = parse_args(argv)
    modules = discover(Path(args.modules_dir) if args.modules_dir else None)
    try:
        device = resolve_device(args.device)
        modules = select(modules, args.only)
    except ValueError as exc:
        print(f"python -m benchmarks: error: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for mod in modules:
            print(f"{mod.key:<16} {mod.path}")
        return 0
    mode = "quick" if args.quick else "full"
    machine = machine_info()
    if args.archive:
        out = archive_folder(REPO_ROOT / "benchmarks" / "results", device_label(machine, device), mode)
    else:
        out = Path("bench_out" if args.out is None else args.out)
    try:
        if args.out is not None and not args.out.strip():
            raise ValueError(f"--out {args.out!r}: empty path; give the output folder")
        check_out_dir(out)
    except ValueError as exc:
        print(f"python -m benchmarks: error: {exc}", file=sys.stderr)
        return 2
    command = "python -m benchmarks " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    run: dict[str, Any] = {
        "mode": mode,
        "device": device,
        "command": command.strip(),
        "started": machine["date"],
        "elapsed_s": 0.0,
        "machine": machine,
        "ceilings": None,
        "modules": [],
    }
    begin = time.perf_counter()
    log = sys.stderr
    print(f"lowrank benchmarks: {mode} mode on {device}, {len(modules)} module(s) -> {out}", file=log)
    interrupted = False
    try:
        if not args.no_ceilings:
            try:
                run["ceilings"] = ceilings(device)
            except Exception as exc:  # the ceilings are context, not a benchmark: note and go on
                run["ceilings"] = {"device": device, "error": f"{type(exc).__name__}: {exc}"}
        for number, mod in enumerate(modules, 1):
            print(f"[{number}/{len(modules)}] {mod.key} ...", file=log, flush=True)
            entry = run_module(mod, quick=args.quick, device=device)
            run["modules"].append(entry)
            tail = f": {entry['error']}" if entry["error"] else ""
            print(
                f"[{number}/{len(modules)}] {mod.key} {entry['status']} in {entry['elapsed_s']:.1f} s{tail}",
                file=log,
                flush=True,
            )
            run["elapsed_s"] = time.perf_counter() - begin
            write_report(run, out, plots=False)  # keep what we have if a later module crashes the process
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: writing the report of the modules that finished", file=log)
    run["elapsed_s"] = time.perf_counter() - begin
    written = write_report(run, out)
    failed = [e["key"] for e in run["modules"] if e["status"] == "failed"]
    skipped = [e["key"] for e in run["modules"] if e["status"] == "skipped"]
    print(
        f"done in {run['elapsed_s']:.1f} s: {written['markdown']}, {written['json']}"
        + (f"; skipped: {', '.join(skipped)}" if skipped else "")
        + (f"; FAILED: {', '.join(failed)}" if failed else ""),
        file=log,
    )
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
