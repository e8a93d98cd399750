"""Shared benchmark helpers: a median timer, one subprocess per case, and a report.

Every benchmark script here follows one pattern::

    import common

    def child(case):                      # runs inside its own subprocess
        inputs = build(case)              # counted in the memory baseline
        return common.measure(lambda: step(inputs), warmup=1, repeats=2)

    def main():                           # the parent
        rows = [common.isolated(__file__, c) | c for c in cases]
        common.print_table(rows, name="title", columns=columns)

    if __name__ == "__main__":
        common.run(child, main)           # the child's report, or main()

Why a subprocess per case: peak resident memory (VmHWM) is a high-water
mark that never goes down, so two cases in one process would hide each other's
peaks; a fresh process also starts with a cold allocator, as a training job does.

Memory is reported as *added* peak: the process's peak resident set during the
measured calls minus its resident set just before them (after imports and after
building the inputs), so the weights and inputs both cases share are not counted.
Resident memory is what the kernel counts against the 24 GiB limit, not only
what torch's allocator asked for.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

RESULT_PREFIX = "BENCH_RESULT "
CASE_FLAG = "--case"
MIB = 1024 * 1024


def current_rss_mib() -> float:
    """Resident set size now (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / MIB
    except (OSError, ValueError, IndexError):
        return peak_rss_mib()


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far: Linux's VmHWM, else ru_maxrss.

    VmHWM first because Linux's ru_maxrss keeps the forking parent's peak across exec, so a
    case started from a large parent would report the parent's peak (ru_maxrss is KiB on
    Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            return int(f.read().split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024


def timer(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 3) -> dict:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times; the median and every time."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "times_s": times}


def measure(
    fn: Callable[[], object],
    *,
    warmup: int = 1,
    repeats: int = 3,
    warmup_fn: Callable[[], object] | None = None,
) -> dict:
    """``timer`` plus the peak resident memory added over the RSS just before the first call.

    ``warmup_fn``, if given, replaces the ``warmup`` calls of ``fn`` (e.g. a
    smaller step on the same inputs); it runs after the baseline is taken, so
    its memory counts, as the peak is a high-water mark of the whole process.
    """
    baseline = current_rss_mib()
    if warmup_fn is not None:
        warmup_fn()
        warmup = 0
    result = timer(fn, warmup=warmup, repeats=repeats)
    result["baseline_mib"] = baseline
    result["peak_added_mib"] = peak_rss_mib() - baseline
    result["loadavg_1min"] = os.getloadavg()[0]  # other processes sharing the cores
    return result


def isolated(
    script: str, case: dict, *, timeout: float | None = None, python: str | None = None
) -> dict:
    """Run ``python script --case <json>`` and return the dict the child passed to ``report``.

    ``python`` is the interpreter (default this one), e.g. a separate venv
    holding a peer library that must not enter the project's environment.

    A child that fails (out of memory, an exception, a timeout) gives
    ``{"error": "..."}`` instead of raising, so one bad case does not lose the table.
    """
    cmd = [python or sys.executable, script, CASE_FLAG, json.dumps(case)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    wall = time.perf_counter() - start
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
            result["process_wall_s"] = wall
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}


def case_from_argv(argv: Sequence[str] | None = None) -> dict | None:
    """In a child started by ``isolated``: its case dict. In the parent: None."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 2 and argv[0] == CASE_FLAG:
        return json.loads(argv[1])
    return None


def report(result: dict) -> None:
    """In a child: hand ``result`` (JSON-serialisable) back to the parent."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run(child: Callable[[dict], dict], main: Callable[[], None]) -> None:
    """A benchmark script's entry: in a child started by ``isolated``, report
    ``child(case)``; in the parent, ``main()``."""
    case = case_from_argv()
    if case is not None:
        report(child(case))
    else:
        main()


def median_ms(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 3) -> float:
    """``timer``'s median in milliseconds."""
    return timer(fn, warmup=warmup, repeats=repeats)["median_s"] * 1e3


def print_table(
    rows: list[dict],
    *,
    name: str,
    columns: Sequence[tuple[str, str, str]] | None = None,
    extra: dict | None = None,
    json_line: bool = True,
) -> None:
    """An aligned text table, then ONE JSON line holding every row with all its figures.

    ``columns`` are (key, header, format spec), default every key of the first
    row as its own header, floats as ``.4g``. A missing or None value prints as
    "-", except the first column the row has no key for, which shows ``row["note"]``
    (e.g. "does not fit (~28 GiB)"). ``extra`` is
    added to the JSON line (machine facts such as the copy bandwidth).
    ``json_line=False`` prints the table only, for a script that prints several
    tables and then one ``print_json`` line.
    """
    if columns is None:
        columns = [(key, key, "") for key in rows[0]] if rows else []
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append([_cell(row, key, spec) for key, _, spec in columns])
        _note_once(cells[-1], row, [key for key, _, _ in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if json_line:
        print_json(name, rows, extra)


def print_json(name: str, rows: list[dict], extra: dict | None = None) -> None:
    """The one JSON line of a benchmark: its rows and ``extra`` facts."""
    print(json.dumps({"benchmark": name, "rows": rows, **(extra or {})}, default=str))


def _cell(row: dict, key: str, spec: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if not spec and isinstance(value, float):
        spec = ".4g"
    return format(value, spec) if spec else str(value)


def _note_once(cells: list[str], row: dict, keys: list[str]) -> None:
    """Put row["note"] in the first column the row has no figure for at all."""
    missing = [i for i, key in enumerate(keys) if key not in row]
    if "note" in row and missing:
        cells[missing[0]] = str(row["note"])
