"""Prompts from the user's files: ``--prompts FILE.jsonl`` and ``--dataset PATH``.

``--prompts`` is read line by line here, not through ``datasets``: a JSONL file may mix
text prompts and chat-message prompts from line to line, which one Arrow column cannot
hold. Both turn each row into a prompt with the same ``task_prompt``.

``--dataset PATH``: prompts from a local data set, read with Hugging Face ``datasets``.

    gspo train --dataset data.parquet --prompt-field text --reward myrewards:score
    gspo train --dataset questions.csv --task arith --answer-field solution
    gspo eval  --dataset saved_dir --task arith        # a directory of Dataset.save_to_disk

A file is read by the builder its suffix names (``.jsonl``/``.json``: json, ``.parquet``,
``.csv``); a directory must have been written by ``save_to_disk``. Nothing is looked up on
the Hub: a name that is not a local path is an error, and ``datasets`` runs in offline mode
while it reads (otherwise even a local json file makes it send a download-count request).
Files are prepared in a temporary cache that is removed afterwards, so a run leaves nothing
in ``~/.cache/huggingface``.

Each row becomes a prompt exactly as a line of ``--prompts`` would (``task_prompt``):
the ``--prompt-field`` column is renamed ``prompt`` and ``--answer-field`` is renamed
``answer``; every other column goes to the reward as a field. With ``--task arith`` the
prompt field is the *question*, to which arith appends its instruction; a column already
called ``prompt`` is then taken as written.

A saved ``DatasetDict`` trains on ``--dataset-split`` (default ``train``, or its only
split) and holds out the first ``--eval-prompts`` rows of its ``test`` (else
``validation``) split; without one, the last 10% of the rows are held out, as with
``--prompts``. ``gspo eval`` asks that held-out split's questions.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

from gspo.train.tasks.base import Prompt, Task
from gspo.train.tasks.registry import get

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
HELD_OUT_SPLITS = ("test", "validation")  # the first one a saved DatasetDict has


def load_prompts_file(path: str | Path, task: str | Task | None = None, *,
                      env: bool = False) -> list[Prompt]:  # fmt: skip
    """Read a JSONL file of ``{"prompt": str | chat messages, ...}`` objects, or of the rows
    ``task`` formats itself (arith: ``{"question", "answer"}``); a UTF-8 byte order mark is
    allowed; errors name the line. ``env``: an environment's ``reset()`` writes the first
    message (--env), so a row may hold only the environment's fields (``task_prompt``)."""
    rows = []
    try:
        # utf-8-sig: editors on Windows (and pandas' to_json) may write a byte order mark
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--prompts {str(path)!r} cannot be read ({err}); fix the path") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"--prompts {path}: line {number} is not JSON ({err})") from None
        rows.append(task_prompt(row, task, f"--prompts {path}: line {number}", env=env))
    if len(rows) < 2:
        raise ValueError(f"--prompts {path}: need at least 2 prompts, found {len(rows)}")
    return rows


def task_prompt(row, task: str | Task | None, where: str, *, env: bool = False) -> Prompt:
    """One row of the user's data as a prompt: formatted by ``task`` if it reads rows
    itself (arith: ``{"question", "answer"}``), then checked; ``where`` starts the error.
    ``env`` (--env): the row's fields go to the environment, whose ``reset()`` writes the
    first message, so a row without ``"prompt"`` is taken as it is (the contract,
    docs/environments.md); a ``"prompt"`` it has must still be a prompt."""
    task = None if task is None else get(task)
    if isinstance(row, dict) and task is not None and task.question_field is not None:
        row = task.from_row(row, where)
    if env and isinstance(row, dict) and "prompt" not in row:
        if not row:
            raise ValueError(f"{where} is an empty object; give the environment's fields")
        return row
    if not isinstance(row, dict) or not _is_prompt(row.get("prompt")):
        got = f"got {type(row.get('prompt')).__name__}" if isinstance(row, dict) else \
            f"got {type(row).__name__}"  # fmt: skip
        raise ValueError(
            f'{where} must be an object with a "prompt" that is a string or a list of chat '
            f'messages [{{"role": "user", "content": "..."}}] ({got})'
        )
    return row


def _is_prompt(value) -> bool:
    if isinstance(value, str):
        return True
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in value
        )
    )  # fmt: skip


def load_dataset_prompts(
    path: str | Path,
    *,
    task: str | Task | None = None,
    prompt_field: str | None = None,
    answer_field: str | None = None,
    split: str | None = None,
    env: bool = False,
) -> tuple[list[Prompt], list[Prompt] | None]:
    """(prompts of the training split, prompts of the held-out split or None): see the
    module docstring for which split is which and how the columns are named. ``env``: rows
    may lack a prompt column (``task_prompt``)."""
    tables = read_local(path, split=split)
    out = [None if table is None else
           as_prompts(table, source=f"--dataset {path}", task=task, prompt_field=prompt_field,
                      answer_field=answer_field, env=env) for table in tables]  # fmt: skip
    rows, held_out = out
    if len(rows) < 2:
        raise ValueError(f"--dataset {path}: need at least 2 prompts, found {len(rows)}")
    return rows, held_out or None


def read_local(path: str | Path, *, split: str | None = None):
    """(training split, held-out split or None) as ``datasets.Dataset`` tables."""
    where = Path(path).expanduser()
    if not where.exists():
        raise ValueError(
            f"--dataset {str(path)!r}: no such file or directory; only local data is supported "
            f"(a {', '.join(BUILDERS)} file or a directory written by Dataset.save_to_disk), "
            "nothing is downloaded from the Hugging Face Hub"
        )
    datasets = _datasets()
    with _offline(datasets):
        if where.is_dir():
            return _from_disk(datasets, where, path, split)
        builder = BUILDERS.get(where.suffix.lower())
        if builder is None:
            raise ValueError(f"--dataset {str(path)!r}: unknown file type {where.suffix!r}; "
                             f"use {', '.join(BUILDERS)} or a save_to_disk directory")  # fmt: skip
        if split is not None:
            raise ValueError(f"--dataset-split {split!r}: a {where.suffix} file has one split; "
                             "--dataset-split is for save_to_disk directories")  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="gspo-datasets-") as cache:
            try:
                # In memory: the temporary cache is gone once this returns.
                table = datasets.load_dataset(builder, data_files=str(where), split="train",
                                              cache_dir=cache, keep_in_memory=True)  # fmt: skip
            except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as err:
                raise ValueError(f"--dataset {str(path)!r} cannot be read as {builder} "
                                 f"({type(err).__name__}: {err})") from None  # fmt: skip
            return table, None


def _from_disk(datasets, where: Path, path, split: str | None):
    try:
        loaded = datasets.load_from_disk(str(where))
    except FileNotFoundError:
        raise ValueError(f"--dataset {str(path)!r} is a directory that Dataset.save_to_disk did "
                         "not write (no dataset_info.json or dataset_dict.json); give a "
                         f"{', '.join(BUILDERS)} file or a saved data set") from None  # fmt: skip
    if isinstance(loaded, datasets.Dataset):
        if split is not None:
            raise ValueError(f"--dataset-split {split!r}: {path} is one saved Dataset, not a "
                             "DatasetDict with splits; drop --dataset-split")  # fmt: skip
        return loaded, None
    names = list(loaded)
    if split is None and "train" not in names and len(names) > 1:
        raise ValueError(f"--dataset {str(path)!r} has no 'train' split but {names}; name the "
                         "one to train on with --dataset-split")  # fmt: skip
    if split is None:
        split = "train" if "train" in names else names[0]
    if split not in names:
        raise ValueError(f"--dataset-split {split!r}: {path} has the splits {names}; "
                         "name one of them")  # fmt: skip
    held = next((name for name in HELD_OUT_SPLITS if name in names and name != split), None)
    return loaded[split], None if held is None else loaded[held]


def as_prompts(table, *, source: str, task: str | Task | None, prompt_field: str | None,
               answer_field: str | None, env: bool = False) -> list[Prompt]:  # fmt: skip
    """The rows of a ``datasets.Dataset`` as task prompts, columns renamed (module docstring).
    ``env``: without a prompt column the rows are the environment's fields as they are."""
    columns = list(table.column_names)
    question = None if task is None else get(task).question_field  # arith: "question"
    if prompt_field is None:  # the task's own rows, e.g. arith's {"question", "answer"}
        prompt_field = question if question is not None and question in columns else "prompt"
        if env and prompt_field not in columns:
            prompt_field = None  # reset() writes the first message
    target = question if question is not None and prompt_field != "prompt" else "prompt"
    renames = {} if prompt_field is None else {prompt_field: target}
    if answer_field is not None:
        if answer_field == prompt_field:
            raise ValueError(f"--answer-field {answer_field!r} is also the prompt field; "
                             "name two different columns")  # fmt: skip
        renames[answer_field] = "answer"
    for field, flag in ((prompt_field, "--prompt-field"), (answer_field, "--answer-field")):
        if field is not None and field not in columns:
            raise ValueError(f"{source}: {flag} {field!r} is not a column; its columns are "
                             f"{columns}")  # fmt: skip
    # Columns a rename replaces: an "answer" column when --answer-field names another one.
    replaced = set(renames.values()) - set(renames)
    out = []
    for number, row in enumerate(table.to_list(), 1):
        row = {renames.get(k, k): v for k, v in row.items() if k in renames or k not in replaced}
        out.append(task_prompt(row, task, f"{source}: row {number}", env=env))
    return out


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ValueError("--dataset needs the 'datasets' package: pip install datasets "
                         "(part of gspo[train])") from None  # fmt: skip
    datasets.disable_progress_bars()  # one bar per read split would cut into the run's own
    return datasets


@contextlib.contextmanager
def _offline(datasets):
    """``datasets`` in offline mode for the duration (it reads its flag at every use; older
    versions call it HF_DATASETS_OFFLINE, newer ones HF_HUB_OFFLINE)."""
    config = datasets.config
    before = {name: getattr(config, name) for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
              if hasattr(config, name)}  # fmt: skip
    for name in before:
        setattr(config, name, True)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(config, name, value)
