"""The layout holds: no import cycle in src/gspo, no source file over 600 lines, and a run
directory written before the layout change (tests/data/run-before-layout: gspo train at
commit bfb57ce, 3 steps, its step-2 checkpoint kept) resumes to the step-3 metrics that
the same run reached without stopping."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
DATA = Path(__file__).resolve().parent / "data"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the gspo modules it imports anywhere (top level or inside functions)."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                    + ([base] if base else []))  # fmt: skip
                # `from pkg import sub` imports the submodule sub when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]  # fmt: skip
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        # Importing a.b.c runs the packages a and a.b first: an edge to each package that
        # does not already hold the importer (a package's own modules see it half-built).
        for target in list(edges):
            parts = target.split(".")
            edges |= {pkg for i in range(1, len(parts))
                      if (pkg := ".".join(parts[:i])) in modules and pkg != name
                      and not name.startswith(pkg + ".")}  # fmt: skip
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node], _ = 2, stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_src():
    graph = import_graph()
    assert "gspo.train.loop" in graph and graph["gspo.loss"]  # the walk saw the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_source_file_over_600_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600}  # fmt: skip
    assert not long


def test_a_run_written_before_the_layout_change_resumes_exactly(tmp_path):
    from gspo.train.cli import main

    run = tmp_path / "run"
    shutil.copytree(DATA / "run-before-layout", run)
    saved_config = json.loads((run / "config.json").read_text())
    # The run computed its log-probs the plain way (before issue 18): resuming it on that
    # path reproduces step 3 exactly; the packed, fused default differs by rounding (the
    # step-3 loss, a sum of cancelling terms, by 7e-9 of 2.3e-4)
    today = {"shared_prefix": False, "fused_loss": False}
    assert main(["--resume", str(run), "--no-progress", "--no-shared-prefix",
                 "--no-fused-loss"]) == 0  # fmt: skip
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    want = json.loads((DATA / "run-before-layout-step-3.json").read_text())
    timing = ("step_time", "tokens_per_s", "time_rollout", "time_update", "time_weight_sync",
              "time_old_logprobs")  # fmt: skip
    # The loss (2.3e-4) is a mean of float32 terms of size ~1 that cancel: its rounding is
    # ~1e-8 absolute and depends on the CPU's kernels (AVX2 vs AVX-512 gave 7.5e-9 apart).
    # A resume that drew another batch or skipped a step moves it by ~1e-4.
    absolute = {"loss": 1e-7}
    for key, value in want.items():
        if key not in timing:
            assert rows[-1][key] == pytest.approx(value, rel=1e-6, abs=absolute.get(key, 1e-9)), key
    # config.json keeps its flat form: the old run's keys and values, what this launch set
    # (the run it resumes, no progress bar), and options added since at their defaults
    from gspo.config import to_dict
    from gspo.train.config import TrainConfig

    written = json.loads((run / "config.json").read_text())
    assert {k: written[k] for k in saved_config} == {**saved_config, "resume": str(run),
                                                     "progress": False}  # fmt: skip
    defaults = {**to_dict(TrainConfig()), **today}
    assert {k: v for k, v in written.items() if k not in saved_config} == \
        {k: defaults[k] for k in set(written) - set(saved_config)}  # fmt: skip
