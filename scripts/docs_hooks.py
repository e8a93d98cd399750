"""MkDocs hooks (mkdocs.yml `hooks:`): pages generated from the code at build time.

- cli.md: `gspo --help` and each command's `--help`, printed by the parsers themselves
  (`build_parser()` in the module that runs the command), never copied by hand;
- api.md: one mkdocstrings block per public name of `gspo` and `gspo.train`, read from
  their `_API` / `__all__` tables, so a name added to the API appears here without an edit;
- changelog.md: CHANGELOG.md from the repository root (MkDocs reads only docs/).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from mkdocs.structure.files import File

REPO = Path(__file__).resolve().parents[1]
WIDTH = "100"  # argparse wraps help to $COLUMNS; fixed, so the page is the same everywhere

# gspo.train's public names, by the module that defines them (gspo.train loads them lazily).
TRAIN_API = {"TrainConfig": "gspo.train.config", "train": "gspo.train.loop"}
CONFIGS = ("ModelConfig", "TaskConfig", "SamplingConfig", "LossConfig", "OptimConfig",
           "RunConfig", "BatchConfig")  # fmt: skip


def cli_page() -> str:
    from gspo import cli

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        parts = ["# CLI reference", "",
                 "Generated at build time from the argparse parsers (`make docs`).", "",
                 "```text", cli._usage(), "```", ""]  # fmt: skip
        for name, (module, _, help_) in cli._COMMANDS.items():
            parser = importlib.import_module(module).build_parser()
            parts += [f"## gspo {name}", "", help_[0].upper() + help_[1:] + ".", "",
                      "```text", parser.format_help().rstrip(), "```", ""]  # fmt: skip
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(parts)


def api_page() -> str:
    import gspo

    parts = ["# API reference", "",
             "Generated at build time from the docstrings (mkdocstrings).", "",
             "## `gspo`", ""]  # fmt: skip
    for name, module in gspo._API.items():
        parts += [f"::: {module}.{name}", ""]
    parts += ["## `gspo.train`", ""]
    for name, module in TRAIN_API.items():
        parts += [f"::: {module}.{name}", ""]
    parts += ["## The configuration's concerns", ""]
    parts += [f"::: gspo.train.config.{name}\n" for name in CONFIGS]
    return "\n".join(parts)


def changelog_page() -> str:
    # Links written from the repository root point into docs/; on the site they are siblings.
    return (REPO / "CHANGELOG.md").read_text().replace("](docs/", "](")


PAGES = {"cli.md": cli_page, "api.md": api_page, "changelog.md": changelog_page}


def on_files(files, config):
    for name, make in PAGES.items():
        files.append(File.generated(config, name, content=make()))
    return files
