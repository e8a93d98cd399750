"""Quiet by default: engine and library output goes to RUN_DIR/library.log.

The `gspo train` command opens a ``session(quiet=not --verbose)``; once the run directory is
claimed, the loop enters ``to_log(RUN_DIR)``, which (only inside a quiet session; the Python
API is left alone) sends to ``library.log`` (``library-rank<k>.log`` on rank k > 0):

- the Python loggers of the libraries gspo drives (LIBRARIES) and the root logger;
- library warnings (``warnings`` raised from installed packages): gspo's own warnings about a
  user's settings (TrainWarning) and warnings from the user's code stay on the console;
- what C code and child processes write to file descriptors 1 and 2 (vLLM's engine process,
  NUMA binding, tcmalloc, Triton), when stdout and stderr are those descriptors: they point
  at the log while Python's ``sys.stdout``/``sys.stderr`` get duplicates of the originals,
  so gspo's lines and its progress bar still reach the terminal.

Everything is restored when the block ends, whatever ends it (tests run many commands in one
process), and an empty log is removed.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys
import warnings
from pathlib import Path

LIBRARIES = ("transformers", "vllm", "torch", "accelerate", "peft", "datasets",
             "huggingface_hub", "urllib3", "filelock", "tensorboard", "wandb", "absl",
             "triton", "numexpr", "httpx")  # fmt: skip
_SESSION = {"quiet": False}


@contextlib.contextmanager
def session(*, quiet: bool):
    """A command's console mode; ``to_log`` does nothing outside a quiet session."""
    before = _SESSION["quiet"]
    _SESSION["quiet"] = quiet
    try:
        yield
    finally:
        _SESSION["quiet"] = before


def log_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / ("library.log" if rank == 0 else f"library-rank{rank}.log")


@contextlib.contextmanager
def to_log(path: Path):
    """Library output to ``path`` for the block (module docstring); yields the path, or None
    outside a quiet session."""
    if not _SESSION["quiet"]:
        yield None
        return
    # vLLM's engine re-configures its logger (dictConfig: a handler of its own on the stream
    # of that moment) unless told not to; then its records reach the handlers set here.
    vllm_config = os.environ.get("VLLM_CONFIGURE_LOGGING")
    os.environ["VLLM_CONFIGURE_LOGGING"] = "0"
    log = None
    try:
        _bind_library_handlers()
        log = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed below
        with _loggers_to(log), _warnings_to(log), _descriptors_to(log):
            yield path
    finally:
        if vllm_config is None:
            os.environ.pop("VLLM_CONFIGURE_LOGGING", None)
        else:
            os.environ["VLLM_CONFIGURE_LOGGING"] = vllm_config
        if log is not None:
            log.close()
        if path.exists() and path.stat().st_size == 0:
            path.unlink()


def _bind_library_handlers() -> None:
    # transformers and vLLM make their console handlers when first imported, bound to the
    # sys.stderr / sys.stdout of that moment: make them now, so that _loggers_to sees them
    # (and, bound to descriptors 1 and 2, anything they write goes to the log).
    if importlib.util.find_spec("transformers") is not None:
        importlib.import_module("transformers.utils.logging").get_logger("transformers")
    if "vllm" in sys.modules or importlib.util.find_spec("vllm") is not None:
        with contextlib.suppress(Exception):  # an optional engine: never fail a run here
            importlib.import_module("vllm.logger")


@contextlib.contextmanager
def _loggers_to(log):
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in LIBRARIES]
    saved = [(lg, lg.handlers[:], lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers = [handler]
        lg.propagate = lg is loggers[0]
    try:
        yield
    finally:
        for lg, handlers, propagate in saved:
            lg.handlers, lg.propagate = handlers, propagate


def _from_a_library(category, filename: str) -> bool:
    if category.__name__ == "TrainWarning":  # gspo's own, about the user's settings
        return False
    parts = Path(filename).parts
    if "gspo" in parts:  # gspo installed as a package
        return False
    return "site-packages" in parts or "dist-packages" in parts or filename.startswith("<")


@contextlib.contextmanager
def _warnings_to(log):
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if _from_a_library(category, str(filename)):
            log.write(warnings.formatwarning(message, category, filename, lineno, line))
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


@contextlib.contextmanager
def _descriptors_to(log):
    swapped = []
    try:
        for name, fd in (("stdout", 1), ("stderr", 2)):
            stream = getattr(sys, name)
            try:
                if stream.fileno() != fd:  # captured (pytest) or redirected: leave it
                    continue
            except (AttributeError, OSError, ValueError):
                continue
            stream.flush()
            keep = os.dup(fd)
            console = open(keep, "w", buffering=1, encoding=stream.encoding,  # noqa: SIM115
                           errors=stream.errors, closefd=False)  # fmt: skip
            os.dup2(log.fileno(), fd)
            setattr(sys, name, console)
            swapped.append((name, fd, keep, stream, console))
        yield
    finally:
        for name, fd, keep, stream, console in reversed(swapped):
            console.flush()
            os.dup2(keep, fd)
            os.close(keep)
            setattr(sys, name, stream)
