"""docs/settings.md's table of every pair of settings (issue 23): every pair among the
sixteen settings has exactly one row, and every test a cell names exists (its file, its
function, and a parametrize id that one of the function's parameter lists can give)."""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FEATURES = ["env", "async", "dynamic sampling", "mask-truncated", "overlong penalty",
            "hf/vllm", "vllm-tp", "vllm-device", "DDP", "FSDP2", "LoRA", "bf16", "top-p",
            "warm start", "shared prefix", "resume"]  # fmt: skip
REF = re.compile(r"`(tests/[\w/]+\.py)(?:::(\w+)(?:\[([\w-]+)\])?)?`")


def _table() -> dict[tuple[str, str], str]:
    text = (REPO / "docs" / "settings.md").read_text(encoding="utf-8")
    section = text.split("<!-- pairs-table: start")[1].split("<!-- pairs-table: end -->")[0]
    cells = {}
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("| pair "):
            continue
        pair, cell = (part.strip() for part in line.strip("|").split("|", 1))
        a, b = pair.split(" + ")
        assert (a, b) not in cells, f"pair {pair} twice"
        cells[(a, b)] = cell
    return cells


def _ids(path: Path, name: str) -> set[str] | None:
    """The parametrize ids a test function can take (None: the function is missing)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            out = set()
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and getattr(deco.func, "attr", "") == "parametrize":
                    ids = next((k.value for k in deco.keywords if k.arg == "ids"), deco.args[1])
                    out |= {e.value for e in getattr(ids, "elts", [])
                            if isinstance(e, ast.Constant) and isinstance(e.value, str)}  # fmt: skip
            return out
    return None


def test_every_pair_has_one_row_with_a_test_or_a_reason():
    cells = _table()
    expected = set(itertools.combinations(FEATURES, 2))
    assert set(cells) == expected, set(cells) ^ expected
    for pair, cell in cells.items():
        refused = "refused:" in cell or "one or the other" in cell
        assert "not tested" not in cell, pair  # every pair runs, or is refused with why
        assert REF.search(cell) or refused, pair
        if refused:  # a refusal names the test that checks it
            assert REF.search(cell.split("refused:")[-1]), pair


def test_every_test_a_cell_names_exists():
    for pair, cell in _table().items():
        for file, name, param in REF.findall(cell):
            path = REPO / file
            assert path.is_file(), (pair, file)
            if not name:
                continue
            ids = _ids(path, name)
            assert ids is not None, (pair, f"{file}::{name}")
            assert not param or param in ids, (pair, f"{file}::{name}[{param}]", ids)
