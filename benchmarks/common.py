"""Shared measurement helpers and the result format of every ``benchmarks/bench_*.py`` module.

Every benchmark module defines ``run(*, quick: bool, device: str) -> BenchResult``. The runner
(``python -m benchmarks``) calls each, then writes ``results.json``, ``report.md`` and the plots.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class Timing:
    """Seconds per call: median of the repeats, and the spread (min, max)."""

    median: float
    min: float
    max: float
    repeats: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class Table:
    """One table of the report: ``rows`` are lists of cells matching ``columns``."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    notes: list[str] = field(default_factory=list)


@dataclass
class Plot:
    """An x/y line plot: ``series`` maps a label to its points; one PNG per plot."""

    file: str
    title: str
    xlabel: str
    ylabel: str
    series: dict[str, list[tuple[float, float]]]
    logx: bool = False
    logy: bool = False
    kind: str = "line"  # "line" or "scatter"


@dataclass
class BenchResult:
    """What one ``bench_*.py`` module's ``run()`` returns: its tables, raw records, plots and notes."""

    name: str
    tables: list[Table] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class SkipBenchmark(Exception):
    """Raise from ``run()`` when a benchmark cannot run here (e.g. it needs two GPUs); the runner
    records the message as a skip, not a failure. A missing optional package (``ModuleNotFoundError``
    for anything other than ``lowrank``/``benchmarks``) is treated the same way."""


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _time_once(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def measure(
    candidates: dict[str, Callable[[], Any]],
    *,
    device: str | torch.device = "cpu",
    warmup: int = 2,
    repeats: int = 7,
    min_time: float = 0.0,
    before_each: Callable[[], Any] | None = None,
) -> dict[str, Timing]:
    """Time several callables side by side, interleaved, after warm-up.

    Each round runs every candidate once, in an order rotated from round to round, so that drift of the
    machine (clock, other load, cache state) lands on all candidates alike. A candidate that takes less
    than ``min_time`` seconds is called several times per sample and the time divided. CUDA timings use
    CUDA events recorded around the call(s), after synchronisation.

    To keep caches from flattering small cases, pass callables that rotate through several input
    buffers (see ``rotating``), and/or ``before_each`` (untimed, before every sample), e.g.
    ``cache_flusher()`` so that every sample starts from a cold last-level cache whatever ran before.
    """
    device = torch.device(device)
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    synchronize(device)
    inner = dict.fromkeys(names, 1)
    if min_time > 0:
        for name in names:
            once = _time_once(candidates[name], device)
            inner[name] = min(100_000, max(1, int(min_time / max(once, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            fn, count = candidates[name], inner[name]
            if before_each is not None:
                before_each()
                synchronize(device)
            if count == 1:
                samples[name].append(_time_once(fn, device))
            else:

                def loop(fn=fn, count=count):
                    for _ in range(count):
                        fn()

                samples[name].append(_time_once(loop, device) / count)
    return {
        name: Timing(statistics.median(vals), min(vals), max(vals), len(vals))
        for name, vals in samples.items()
    }


def measure_apart(
    candidates: dict[str, Callable[[], Any]],
    *,
    foreign: tuple[str, ...] = ("sklearn", "scipy", "numpy"),
    **kwargs: Any,
) -> dict[str, Timing]:
    """:func:`measure`, with the candidates whose names start with one of ``foreign`` (libraries on NumPy's
    BLAS) timed in a loop of their own, and the torch candidates interleaved in another.

    NumPy's BLAS keeps its worker threads spinning for a while after a call; on a 2-core machine the torch
    call that came next lost the cores to them (measured: a sparse ``rsvd`` took 45 ms at the start of a
    round and 116-134 ms right after scikit-learn's ``randomized_svd``). Each loop has its own warm-up, so
    no timed call follows the other thread pool's work. ``kwargs`` go to :func:`measure`.
    """
    apart = {name: fn for name, fn in candidates.items() if name.startswith(foreign)}
    native = {name: fn for name, fn in candidates.items() if name not in apart}
    out: dict[str, Timing] = {}
    for group in (apart, native):
        if group:
            out.update(measure(group, **kwargs))
    return {name: out[name] for name in candidates}


def cache_flusher(nbytes: int = 256 << 20, device: str | torch.device = "cpu") -> Callable[[], Any]:
    """A callable that streams ``nbytes`` through the memory hierarchy (read and write), evicting what the
    caches held: pass as ``measure(..., before_each=...)`` to time every sample from a cold cache."""
    buffer = torch.ones(nbytes // 4, dtype=torch.float32, device=device)

    def flush():
        buffer.add_(1.0)

    return flush


def rotating(make_call: Callable[[Any], Any], inputs: Sequence[Any]) -> Callable[[], Any]:
    """A callable that applies ``make_call`` to the next of ``inputs`` at each call (round robin)."""
    state = {"i": 0}

    def call():
        item = inputs[state["i"] % len(inputs)]
        state["i"] += 1
        return make_call(item)

    return call


def fmt_time(seconds: float) -> str:
    """Human-readable time: 12.3 us, 4.56 ms, 1.23 s."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_timing(timing: Timing) -> str:
    """Median with the spread: ``1.23 ms (1.20 ms-1.31 ms)``."""
    return f"{fmt_time(timing.median)} ({fmt_time(timing.min)}-{fmt_time(timing.max)})"
