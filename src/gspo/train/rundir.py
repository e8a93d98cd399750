"""The run directory: chosen at launch, created only when training starts, never shared.

``resolve`` picks RUN_DIR (``--resume``, ``--run-dir`` or ``runs/<timestamp>``) and refuses a
non-empty one unless the run resumes it: reusing it would truncate another run's
metrics.jsonl, overwrite its config.json and leave its checkpoints for a later ``--resume``
to load. ``create`` makes the directory and writes config.json once every start-up check has
passed, so a launch that fails before the first step leaves nothing behind.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from gspo.config import to_dict
from gspo.train import distributed as dd
from gspo.train.config import TrainConfig


def resolve(config: TrainConfig, world: dd.World) -> Path:
    """RUN_DIR for this run (not created yet); rank 0 decides, every rank gets its answer."""
    run = config.run
    if run.resume:
        return Path(run.resume)
    if run.run_dir:
        path = Path(run.run_dir)
    else:
        path = Path("runs") / dd.broadcast_object(time.strftime("%Y%m%d-%H%M%S"), world)
    error = None
    if world.main and path.exists():
        if not path.is_dir():
            error = f"--run-dir {str(path)!r} is a file; give a directory"
        elif any(path.iterdir()):
            held = ", ".join(sorted(p.name for p in path.iterdir())[:4])
            error = (
                f"--run-dir {str(path)!r} is not empty (it holds {held}); continue that run "
                f"with --resume {path}, or give a new --run-dir (or remove the directory)"
            )
    error = dd.broadcast_object(error, world)
    if error:
        raise ValueError(error)
    return path


def create(path: Path, config: TrainConfig, world: dd.World) -> None:
    """Make RUN_DIR and write config.json (the config this run, or resumed run, uses)."""
    if world.main:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
    dd.barrier(world)
