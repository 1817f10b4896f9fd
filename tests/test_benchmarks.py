"""Smoke tests of the benchmark runner (``python -m benchmarks``) on throwaway bench modules.

The modules below live in a temporary directory (``--modules-dir``), never in ``benchmarks/``: one that
works (a table, a Timing cell, a plot, records with tensors and NaN), one that raises, one whose optional
dependency is missing, and one that raises ``SkipBenchmark``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from benchmarks.__main__ import main
from benchmarks.common import Timing, measure, measure_apart, rotating
from benchmarks.report import fmt_cell, to_jsonable

REPO_ROOT = Path(__file__).resolve().parent.parent

FAKE_OK = """
import math
import torch
from benchmarks.common import BenchResult, Plot, Table, Timing, measure

def run(*, quick: bool, device: str) -> BenchResult:
    x = torch.full((8,), 3.0)
    timing = measure({"sum": lambda: x.sum()}, device=device, warmup=1, repeats=3)["sum"]
    table = Table(
        title="fake speed table",
        columns=["case", "time", "value", "speed-up"],
        rows=[["case_alpha", timing, 0.123456789, 2.5], ["case_beta|pipe", timing, 12345678.0, None]],
        notes=["a table note"],
    )
    plot = Plot(
        file="fake_plot.png",
        title="fake time vs n",
        xlabel="n",
        ylabel="seconds",
        series={"lowrank": [(1, 1e-3), (2, 2e-3), (4, 0.0)], "other": [(1, 2e-3), (4, 8e-3)]},
        logx=True,
        logy=True,
    )
    records = [{"case": "case_alpha", "quick": quick, "device": device, "timing": timing,
                "tensor": torch.tensor([1.5, 2.5]), "nan": math.nan, "dtype": torch.float32}]
    return BenchResult(name="fake benchmark", tables=[table], records=records, plots=[plot],
                       notes=["a module note"])
"""

FAKE_BROKEN = """
def run(*, quick, device):
    raise RuntimeError("deliberate failure 4242")
"""

FAKE_NEEDS_DEP = """
import a_package_that_is_not_installed_xyz  # noqa: F401

def run(*, quick, device):
    raise AssertionError("unreachable")
"""

FAKE_SKIP = """
from benchmarks.common import SkipBenchmark

def run(*, quick, device):
    raise SkipBenchmark("needs two GPUs")
"""


@pytest.fixture()
def bench_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "benches"
    directory.mkdir()
    for name, source in [
        ("bench_fake.py", FAKE_OK),
        ("bench_broken.py", FAKE_BROKEN),
        ("bench_needsdep.py", FAKE_NEEDS_DEP),
        ("bench_skipme.py", FAKE_SKIP),
    ]:
        (directory / name).write_text(textwrap.dedent(source))
    (directory / "helper_not_a_bench.py").write_text("raise RuntimeError('must not be imported')\n")
    return directory


def test_full_run_reports_ok_failed_and_skipped(bench_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main(["--modules-dir", str(bench_dir), "--out", str(out), "--device", "cpu", "--no-ceilings"])
    assert code == 1  # bench_broken failed, so the suite fails at the end; the others still ran

    data = json.loads((out / "results.json").read_text())
    assert data["mode"] == "quick" and data["device"] == "cpu"
    assert torch.__version__.startswith(data["machine"]["versions"]["torch"])
    assert data["machine"]["cpu_count"] >= 1
    status = {m["key"]: m["status"] for m in data["modules"]}
    assert status == {"fake": "ok", "broken": "failed", "needsdep": "skipped", "skipme": "skipped"}
    by_key = {m["key"]: m for m in data["modules"]}
    assert "deliberate failure 4242" in by_key["broken"]["error"]
    assert "RuntimeError" in by_key["broken"]["traceback"]
    assert "a_package_that_is_not_installed_xyz" in by_key["needsdep"]["error"]
    assert by_key["skipme"]["error"] == "needs two GPUs"
    assert all(m["elapsed_s"] >= 0 for m in data["modules"])

    fake = by_key["fake"]["result"]
    assert fake["name"] == "fake benchmark"
    table = fake["tables"][0]
    assert table["columns"] == ["case", "time", "value", "speed-up"]
    timing = table["rows"][0][1]
    assert set(timing) == {"median", "min", "max", "repeats"} and timing["repeats"] == 3
    assert timing["min"] <= timing["median"] <= timing["max"]
    record = fake["records"][0]
    assert record["tensor"] == [1.5, 2.5] and record["nan"] is None and record["dtype"] == "torch.float32"
    assert fake["plots"][0]["png"] == "plots/fake_plot.png"
    assert "1 non-finite" in fake["plots"][0]["note"]  # (4, 0.0) cannot go on a log axis

    png = out / "plots" / "fake_plot.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000

    report = (out / "report.md").read_text()
    assert report.index("## Machine") < report.index("## fake")  # machine info first
    assert "fake speed table" in report and "case_alpha" in report and "case_beta\\|pipe" in report
    assert "0.1235" in report and "1.235e+07" in report and "2.5" in report
    assert "a module note" in report and "a table note" in report
    assert "![fake time vs n](plots/fake_plot.png)" in report
    assert "deliberate failure 4242" in report and "needs two GPUs" in report
    assert "| [fake](#fake) | ok |" in report


def test_only_selects_and_succeeds(bench_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "only"
    code = main(["--modules-dir", str(bench_dir), "--out", str(out), "--only", "fake,bench_skipme", "--full"])
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    assert data["mode"] == "full"
    assert [m["key"] for m in data["modules"]] == ["fake", "skipme"]
    assert data["modules"][0]["result"]["records"][0]["quick"] is False
    assert data["ceilings"]["memory_GBps"] > 0 and data["ceilings"]["matmul_TFLOPs"]["float32"] > 0


def test_bad_arguments_are_clear_errors(bench_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["--modules-dir", str(bench_dir), "--out", str(tmp_path), "--only", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "nosuch" in err and "fake" in err  # names the unknown one and lists what exists
    if not torch.cuda.is_available():
        assert main(["--modules-dir", str(bench_dir), "--out", str(tmp_path), "--device", "cuda"]) == 2
        assert "--device cuda" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--device", "tpu"])
    assert not (tmp_path / "results.json").exists()


def test_command_line_entry_point(bench_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--modules-dir", str(bench_dir), "--only", "fake",
         "--out", str(out), "--no-ceilings"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "fake ok in" in done.stderr  # one progress line per module with its elapsed time
    assert "case_alpha" in (out / "report.md").read_text()


def test_malformed_result_is_a_clear_failure(tmp_path: Path) -> None:
    directory = tmp_path / "malformed"
    directory.mkdir()
    (directory / "bench_wrongtype.py").write_text("def run(*, quick, device):\n    return {'tables': []}\n")
    (directory / "bench_longrow.py").write_text(
        "from benchmarks.common import BenchResult, Table\n"
        "def run(*, quick, device):\n"
        "    return BenchResult('x', tables=[Table('wide', ['a'], [[1, 2]])])\n"
    )
    out = tmp_path / "out"
    assert main(["--modules-dir", str(directory), "--out", str(out), "--no-ceilings"]) == 1
    errors = {m["key"]: m["error"] for m in json.loads((out / "results.json").read_text())["modules"]}
    assert "returned dict, not BenchResult" in errors["wrongtype"]
    assert "table 'wide' row 0" in errors["longrow"]


def test_measure_interleaves_and_counts_calls() -> None:
    calls = {"a": 0, "b": 0}

    def bump(name: str):
        def call():
            calls[name] += 1

        return call

    timings = measure({"a": bump("a"), "b": bump("b")}, warmup=2, repeats=5)
    assert calls == {"a": 7, "b": 7}
    for t in timings.values():
        assert t.repeats == 5 and 0 <= t.min <= t.median <= t.max


def test_rotating_cycles_inputs() -> None:
    seen = []
    call = rotating(seen.append, [1, 2, 3])
    for _ in range(7):
        call()
    assert seen == [1, 2, 3, 1, 2, 3, 1]


def test_cell_and_json_formatting() -> None:
    assert fmt_cell(Timing(1.5e-3, 1.2e-3, 2.0e-3, 5)) == "1.50 ms (1.20 ms-2.00 ms)"
    assert fmt_cell(None) == "-" and fmt_cell(True) == "yes" and fmt_cell(3) == "3"
    assert fmt_cell(torch.tensor(0.5)) == "0.5" and fmt_cell("a|b\nc") == "a\\|b c"
    assert to_jsonable({"x": (float("inf"), torch.tensor([[1, 2]]))}) == {"x": [None, [[1, 2]]]}


GPU_CHECK = REPO_ROOT / "benchmarks" / "gpu_check.sh"


def test_gpu_check_dry_run_lists_bounded_steps():
    proc = subprocess.run(
        ["bash", str(GPU_CHECK)], env={**os.environ, "GPU_CHECK_DRY": "1"}, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    header, *steps = proc.stdout.strip().splitlines()
    bounds = [int(re.search(r"<=\s+(\d+) s", line).group(1)) for line in steps]
    assert len(bounds) == 8 and sum(bounds) <= 420
    assert f"add up to {sum(bounds)} s" in header
    text = proc.stdout
    # kernel tests first, each sanitizer tool, benchmarks before the sanitizers, no caching allocator
    assert (
        text.index("tests/test_cuda_paths.py") < text.index("the rest on CUDA") < text.index("benchmarks (")
    )
    assert text.index("benchmarks (") < text.index("memcheck")
    for tool in ("memcheck", "initcheck", "racecheck"):
        assert f"--tool {tool}" in text
    assert "PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck" in text
    assert "pip install" not in GPU_CHECK.read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_gpu_check_without_a_gpu_says_so_and_exits_quickly(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(GPU_CHECK)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "no CUDA GPU here" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing built, nothing written


def test_sanitizer_cases_name_existing_paths():
    from benchmarks import memcheck_case

    labels = {case[0] for case in memcheck_case.SINGLE} | {case[0] for case in memcheck_case.MULTI}
    assert memcheck_case.SMALL <= labels
    # the documented path rules: each kernel path is reached by at least one case
    single = memcheck_case.SINGLE
    assert any(m <= 16 and m * r == 4096 for _, m, _, _, r, _, _ in single)  # shared-memory edge
    assert any(m > 16 or m * r > 4096 for _, m, _, _, r, _, _ in single)  # cuBLAS composite
    assert any(offs[1] == 1 and sum(offs) == 1 for *_, offs in single)  # W alone misaligned
    multi = memcheck_case.MULTI
    assert any(m <= 64 or m < 64 * n for _, m, _, _, _, n, _, _ in multi)  # BGMV
    assert any(m > 64 and m >= 64 * n and rule == "runs" for _, m, _, _, _, n, rule, _ in multi)  # segments


def test_measure_apart_never_times_a_torch_call_right_after_a_numpy_blas_one() -> None:
    """Candidates on NumPy's BLAS (names starting sklearn/scipy/numpy) run in their own loop, warm-up
    included, so none of the torch candidates' calls follows one of theirs; every name gets its samples."""
    calls: list[str] = []

    def make(name):
        return lambda: calls.append(name)

    names = ["lowrank a", "sklearn b", "torch c", "scipy d", "lowrank e"]
    timings = measure_apart({name: make(name) for name in names}, warmup=1, repeats=4)
    assert list(timings) == names
    assert all(isinstance(t, Timing) and t.repeats == 4 for t in timings.values())
    foreign = {"sklearn b", "scipy d"}
    last_foreign = max(i for i, name in enumerate(calls) if name in foreign)
    first_native = min(i for i, name in enumerate(calls) if name not in foreign)
    assert last_foreign < first_native  # one loop after the other
    assert len(calls) == 5 * (1 + 4)


def test_bad_out_paths_and_empty_only_fail_before_any_benchmark_runs(
    bench_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    # found by a user test: --out naming a file (or a path under one) ran every module, then died with a
    # FileExistsError / NotADirectoryError traceback; --only '' ran the whole suite instead of refusing.
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for out in (afile, afile / "sub"):
        code = main(["--modules-dir", str(bench_dir), "--out", str(out), "--only", "broken", "--no-ceilings"])
        err = capsys.readouterr().err
        assert code == 2 and "--out" in err and "is a file" in err
        assert "Traceback" not in err and "broken ..." not in err  # refused before running anything
    assert afile.read_text() == "keep me"
    assert main(["--modules-dir", str(bench_dir), "--out", str(tmp_path / "o"), "--only", ""]) == 2
    assert "--only" in capsys.readouterr().err and not (tmp_path / "o").exists()
    monkeypatch.chdir(tmp_path)
    assert main(["--modules-dir", str(bench_dir), "--out", "", "--only", "fake"]) == 2  # wrote bench_out/
    assert "--out" in capsys.readouterr().err and sorted(os.listdir(tmp_path)) == ["afile", "benches"]


def test_archive_never_overwrites_a_committed_report(bench_dir: Path, tmp_path: Path, monkeypatch) -> None:
    # found by a user test: a second --archive run on the same day replaced the committed report of the
    # first (here: its results.json), and --out given with --archive was silently ignored.
    import benchmarks.__main__ as runner

    monkeypatch.setattr(runner, "REPO_ROOT", tmp_path)
    args = [
        "--modules-dir",
        str(bench_dir),
        "--only",
        "fake",
        "--archive",
        "--no-ceilings",
        "--device",
        "cpu",
    ]
    assert main(args) == 0 and main(args) == 0
    folders = sorted(p.name for p in (tmp_path / "benchmarks" / "results").iterdir())
    assert len(folders) == 2 and folders[0].split("_")[0] + "b" == folders[1].split("_")[0]
    for folder in folders:
        data = json.loads((tmp_path / "benchmarks" / "results" / folder / "results.json").read_text())
        assert [m["key"] for m in data["modules"]] == ["fake"]
    with pytest.raises(SystemExit):
        main([*args, "--out", str(tmp_path / "ignored")])
    assert not (tmp_path / "ignored").exists()


def test_ctrl_c_while_measuring_the_ceilings_is_a_clean_interrupt(
    bench_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    # found by a user test: Ctrl-C during the ceilings measurement (seconds, before the first module) was
    # outside the interrupt handler: a KeyboardInterrupt traceback and no report
    import benchmarks.__main__ as runner

    def interrupted(device):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "ceilings", interrupted)
    out = tmp_path / "out"
    assert main(["--modules-dir", str(bench_dir), "--only", "fake", "--out", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    data = json.loads((out / "results.json").read_text())
    assert data["modules"] == [] and "fake" not in (out / "report.md").read_text().split("## Machine")[1]


def test_archive_folders_of_a_day_sort_in_the_order_they_were_made(tmp_path: Path) -> None:
    # seen this session: a quick archive after 2026-12-01g_<machine>_quick and 2026-12-01c_<machine>_full-init
    # went to the free 2026-12-01c_<machine>_quick, sorting before folders made hours earlier
    import datetime

    from benchmarks.__main__ import archive_folder

    stamp = datetime.date.today().isoformat()
    assert archive_folder(tmp_path, "m", "quick").name == f"{stamp}_m_quick"  # no results folder yet
    for name in (f"{stamp}_m_quick", f"{stamp}c_m_full", f"{stamp}b_other_quick", "2020-01-01f_m_quick"):
        (tmp_path / name).mkdir()
    assert archive_folder(tmp_path, "m", "quick").name == f"{stamp}d_m_quick"
    assert archive_folder(tmp_path, "other", "full").name == f"{stamp}c_other_full"
    (tmp_path / f"{stamp}z_m_full").mkdir()
    with pytest.raises(ValueError, match="used up"):
        archive_folder(tmp_path, "m", "quick")
