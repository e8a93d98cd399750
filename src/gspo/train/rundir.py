"""The run directory: claimed atomically at launch, before the model loads, never shared.

``resolve`` picks RUN_DIR (``--resume``, ``--run-dir`` or ``runs/<timestamp>``) and claims it
on rank 0 before anything slow runs: the directory is made (a timestamped name that another
launch took in the same second gets a suffix, ``-2``, ``-3``, ...; ``mkdir`` is atomic, so
two launches never share one), and a lock file is written and locked (``flock``, released by
the kernel when the process dies). Writing it proves RUN_DIR writable before the model loads;
the lock refuses a second launch on a RUN_DIR a live run holds (``--resume`` included). A
non-empty RUN_DIR is refused unless the run resumes it: reusing it would truncate another
run's metrics.jsonl, overwrite its config.json and leave its checkpoints for a later
``--resume`` to load. ``create`` writes config.json once every start-up check has passed;
``release`` (on any exit) unlocks, and removes a RUN_DIR this launch made that training never
started in, so a launch that fails before the first step leaves nothing behind. Rank 0's
answer (the path, or the error) is broadcast, so every rank raises the same error at once.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

from gspo.config import to_dict
from gspo.train import distributed as dd
from gspo.train.config import TrainConfig

LOCK = ".gspo-lock"
_HELD: dict[Path, tuple[int, list[Path]]] = {}  # RUN_DIR -> (lock fd, dirs this launch made)


def resolve(config: TrainConfig, world: dd.World) -> Path:
    """Claim RUN_DIR for this run (rank 0 makes and locks it; every rank gets its answer)."""
    run = config.run
    answer = None
    if world.main:
        try:
            answer = _claim(run.resume, run.run_dir)
        except ValueError as err:
            answer = err
    answer = dd.broadcast_object(answer if isinstance(answer, Path) else str(answer), world)
    if not isinstance(answer, Path):
        raise ValueError(answer)
    return answer


def _claim(resume: str | None, run_dir: str | None) -> Path:
    if resume or run_dir:
        path = Path(resume or run_dir)
        flag = "--resume" if resume else "--run-dir"
        if path.exists() and not path.is_dir():
            raise ValueError(f"{flag} {str(path)!r} is a file; give a directory")
        made = _os_call(lambda: _mkdirs(path), flag, path)
    else:
        made = _os_call(lambda: _mkdirs(Path("runs")), "the run directory", Path("runs"))
        path, flag = _new_timestamped(Path("runs")), "the run directory"
        made.append(path)
    _lock(path, made, flag)
    held = sorted(p.name for p in path.iterdir() if p.name != LOCK)
    if held and not resume:
        release(path)
        raise ValueError(
            f"--run-dir {str(path)!r} is not empty (it holds {', '.join(held[:4])}); continue "
            f"that run with --resume {path}, or give a new --run-dir (or remove the directory)"
        )
    return path


def _new_timestamped(parent: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for k in range(1, 1000):
        path = parent / (stamp if k == 1 else f"{stamp}-{k}")
        try:
            path.mkdir()  # atomic: exactly one launch makes it
            return path
        except FileExistsError:
            continue
        except OSError as err:
            raise ValueError(_os_message("the run directory", path, err)) from None
    raise ValueError(f"{parent}/{stamp}-* are all taken; give --run-dir")


def _mkdirs(path: Path) -> list[Path]:
    """Make ``path`` and its missing parents; the ones made, outermost first."""
    missing = [p for p in (path, *path.parents) if not p.exists()][::-1]
    path.mkdir(parents=True, exist_ok=True)
    return missing


def _lock(path: Path, made: list[Path], flag: str) -> None:
    import fcntl

    lock = path / LOCK
    fd = _os_call(lambda: os.open(lock, os.O_RDWR | os.O_CREAT, 0o644), flag, lock)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.EAGAIN, errno.EACCES):
            raise ValueError(_os_message(flag, lock, err)) from None
        owner = lock.read_text().strip() or "another process"
        raise ValueError(f"{flag} {str(path)!r} is in use by a live run ({owner}); wait for "
                         "it to end, or give another --run-dir") from None  # fmt: skip
    os.ftruncate(fd, 0)
    _os_call(lambda: os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode()),
             flag, lock)  # fmt: skip
    _HELD[path] = (fd, made)


def release(path: Path) -> None:
    """Unlock RUN_DIR; remove it if this launch made it and training never started there
    (it holds nothing but the lock). A no-op where this process holds no lock (rank > 0)."""
    fd, made = _HELD.pop(path, (None, []))
    if fd is None:
        return
    (path / LOCK).unlink(missing_ok=True)
    os.close(fd)
    if made and not (path / "config.json").exists():
        # training never started: the libraries' output of a failed load (library*.log,
        # gspo.train.console) goes with the directory; the refusal itself was on the console
        for log in path.glob("library*.log"):
            log.unlink(missing_ok=True)
    for directory in reversed(made):  # innermost first, each only while empty
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()


def create(path: Path, config: TrainConfig, world: dd.World) -> None:
    """Write config.json (the config this run, or resumed run, uses) into the claimed RUN_DIR."""
    if world.main:
        config_file = path / "config.json"
        _os_call(lambda: config_file.write_text(json.dumps(to_dict(config), indent=2) + "\n"),
                 "the run directory", config_file)  # fmt: skip
    dd.barrier(world)


def _os_call(fn, what: str, path: Path):
    try:
        return fn()
    except OSError as err:
        raise ValueError(_os_message(what, path, err)) from None


def _os_message(what: str, path: Path, err: OSError) -> str:
    return (f"{what}: cannot write {str(path)!r} ({err.strerror or err}); give a writable "
            "directory with --run-dir")  # fmt: skip
