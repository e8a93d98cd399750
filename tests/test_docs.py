"""The front page and the documentation site: README's shape, the site's pages and nav, the
generated CLI and API references, and the package's one version."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from gspo.cli import main

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_readme_is_a_front_page_that_starts_with_the_two_commands():
    # CI (.ci/run) runs the test command README names; a newcomer reads it in minutes.
    first_block = README.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line.split()[:2] for line in first_block] == [["make", "demo"], ["make", "test"]]
    assert "make test" in (REPO / ".ci" / "run").read_text()
    assert len(README.splitlines()) <= 220
    for section in ("The objective", "the loss in your own", "`gspo train` on your model",
                    "environment", "What runs where", "compares with peer"):
        assert section.lower() in README.lower(), section


def nav_pages() -> list[str]:
    text = (REPO / "mkdocs.yml").read_text()
    return re.findall(r":\s+([\w./-]+\.md)\s*$", text, flags=re.M)


GENERATED = {"cli.md", "api.md", "changelog.md"}  # scripts/docs_hooks.py writes them


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    nav = nav_pages()
    on_disk = {p.name for p in (REPO / "docs").glob("*.md")}
    assert len(nav) == len(set(nav))
    assert set(nav) - GENERATED == on_disk  # no orphan page, no entry without a page
    assert GENERATED <= set(nav)
    assert not GENERATED & on_disk  # generated, never a copy on disk


def load_hooks():
    pytest.importorskip("mkdocs")
    spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "scripts" / "docs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cli_reference_is_each_parsers_own_help(monkeypatch):
    from gspo import cli
    from gspo.train import cli as train_cli
    from gspo.train import evaluate

    hooks = load_hooks()
    page = hooks.cli_page()
    for name in cli._COMMANDS:
        assert f"## gspo {name}" in page
    # flags from the config dataclasses and from the parsers' own additions
    for flag in ("--dynamic-sampling", "--compare-seeds", "--lora-r", "--explain", "--run"):
        assert flag in page, flag
    assert page.count("usage: gspo ") == 1 + len(cli._COMMANDS)
    monkeypatch.setenv("COLUMNS", hooks.WIDTH)
    for parser in (cli.build_parser(), train_cli.build_parser(), evaluate.build_parser()):
        assert parser.format_help().rstrip() in page, parser.prog


def test_the_api_reference_documents_every_public_name():
    import gspo

    page = load_hooks().api_page()
    for name, module in gspo._API.items():
        assert f"::: {module}.{name}\n" in page
    for name in ("TrainConfig", "train"):
        assert re.search(rf"^::: gspo\.train\.\w+\.{name}$", page, flags=re.M), name


def test_the_changelog_page_is_the_changelog_with_site_links():
    page = load_hooks().changelog_page()
    assert page.startswith("# Changelog") and "](docs/" not in page
    assert "[docs/spec.md](spec.md)" in page


def test_version_is_one_number_everywhere(capsys):
    import gspo

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"gspo {gspo.__version__}"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'version = { attr = "gspo.__version__" }' in pyproject
    assert re.fullmatch(r"\d+\.\d+\.\d+", gspo.__version__)
    assert f"## {gspo.__version__}" in (REPO / "CHANGELOG.md").read_text()


@pytest.mark.skipif(sys.platform == "win32", reason="make")
def test_make_names_the_ci_targets():
    makefile = (REPO / "Makefile").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    for target in ("lint", "test", "docs", "package"):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target
        assert f"make {target}" in ci, target
    assert "mkdocs build --strict" in makefile and "twine check" in makefile


def source_text() -> str:
    """Every .py file under src/, adjacent string literals joined (a message split over
    lines, ``"a " "b"``, reads as ``a b``)."""
    text = "\n".join(p.read_text() for p in sorted((REPO / "src").rglob("*.py")))
    return re.sub(r"[\"']\s*(?:#[^\n]*)?\n\s*f?[\"']", "", text)


def quoted_messages(page: str) -> list[str]:
    """The messages a page quotes: the first cell of each row of its "Message" tables, and
    every bold code span (``**`...`**``)."""
    found, in_table = [], False
    for line in page.splitlines():
        if line.startswith("| Message |"):
            in_table = True
        elif not line.startswith("|"):
            in_table = False
        elif in_table and not line.startswith("| ---"):
            found += re.findall(r"`([^`]+)`", line.split("|")[1])
    return found + re.findall(r"\*\*`([^`]+)`\*\*", page)


def test_every_message_the_troubleshooting_page_quotes_is_in_the_source():
    page = (REPO / "docs" / "troubleshooting.md").read_text()
    quoted = quoted_messages(page)
    assert len(quoted) >= 20, quoted
    source = source_text()
    missing = [m for m in quoted if m not in source]
    assert not missing, f"docs/troubleshooting.md quotes messages gone from src/: {missing}"
