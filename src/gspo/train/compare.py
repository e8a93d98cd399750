"""`gspo train --compare`: the same job under several losses and seeds, and one plot.

    gspo train --compare                              # gspo, grpo, grpo at eps 0.2; the run's seed
    gspo train --compare gspo grpo --compare-seeds 0 1 2
    gspo train --compare gspo "grpo:eps_low=0.2,eps_high=0.2" --steps 100

Each ``--compare`` value is a loss (``gspo.objectives.names()``), optionally followed by
``:option=value,...``: the loss options of LossConfig (clip range, KL, advantage
normalisation...) and the objective's own (``gspo train --loss NAME:option=value``), so a
token-level loss can run at its usual clip range next to GSPO's.
Every (loss, seed) is a full ``gspo train`` into ``RUN_DIR/<loss>/seed<k>``; the other
options are the command's own. ``RUN_DIR/compare.png`` draws the held-out reward of every
loss: the mean over seeds, and the band from the lowest to the highest seed.
``RUN_DIR/compare.json`` holds every run's held-out curve and time.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from gspo.config import flags
from gspo.objectives import registry
from gspo.train.config import LossConfig, TrainConfig

# What `--compare` alone runs: GSPO, GRPO with the same clip range, and GRPO with the 0.2
# that token-level methods usually use.
DEFAULT = ("gspo", "grpo", "grpo:eps_low=0.2,eps_high=0.2")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One curve: ``label`` as given on the command line, the options it changes, and the
    directory name of its runs."""

    label: str
    changes: dict

    @property
    def dirname(self) -> str:
        return self.label.replace(":", "-").replace(",", "-").replace("=", "")


def parse_variants(specs: Sequence[str]) -> list[Variant]:
    """``LOSS`` or ``LOSS:option=value,...`` each; a ValueError names the bad part and the fix."""
    known = {f.name: f for f in flags(LossConfig)}
    out = []
    for spec in specs or DEFAULT:
        loss, _, options = spec.partition(":")
        if loss not in registry.names():
            raise ValueError(f"--compare {spec!r}: unknown loss {loss!r}; use one of "
                             f"{list(registry.names())}, optionally as LOSS:option=value,...")
        changes, own = {"loss": loss}, []
        takes = set(registry.get(loss).options) | set(registry.COMMON_OPTIONS)
        for item in filter(None, options.split(",")):
            name, eq, text = item.partition("=")
            name = name.strip().replace("-", "_")
            if eq and name in takes - set(known):  # the objective's own: in --loss NAME:...
                own.append(f"{name}={text.strip()}")
                continue
            if not eq or name not in known or name == "loss":
                choices = sorted((set(known) | takes) - {"loss"})
                raise ValueError(f"--compare {spec!r}: {item!r} is not option=value of the "
                                 f"loss's options {choices}")  # fmt: skip
            changes[name] = _value(spec, name, text.strip(), known[name].base)
        if own:
            changes["loss"] = f"{loss}:{','.join(own)}"
            registry.parse_spec(changes["loss"], f"--compare {spec!r}:")
        out.append(Variant(spec, changes))
    labels = [v.dirname for v in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--compare {' '.join(specs)}: a loss is listed twice; give each once")
    return out


def _value(spec: str, name: str, text: str, base: type):
    try:
        if base is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
        return base(text)
    except ValueError:
        raise ValueError(f"--compare {spec!r}: {name}={text!r} is not a "
                         f"{base.__name__}") from None  # fmt: skip


def run_compare(config: TrainConfig, specs: Sequence[str], seeds: Sequence[int] = ()) -> int:
    """Train every (loss, seed), print one line per loss (held-out reward at the first and
    last evaluation and the best one: mean and range over seeds; seconds per run), write
    compare.json and draw compare.png. Every variant is built (and checked) before any
    trains."""
    from gspo.train.loop import train
    from gspo.train.plot import plot_compare, read_metrics

    if config.run.resume:
        raise ValueError("--compare starts fresh runs: drop --resume (resume each run under "
                         "RUN_DIR/<loss>/seed<k> on its own)")  # fmt: skip
    variants = parse_variants(specs)
    seeds = list(seeds) or [config.run.seed]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--compare-seeds {seeds}: a seed is listed twice")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(config.run.run_dir or Path("runs") / f"compare-{stamp}")
    jobs = {
        (v.label, s): config.replace(
            **v.changes, seed=s, resume=None, run_dir=str(base / v.dirname / f"seed{s}")
        )
        for v in variants
        for s in seeds
    }  # fmt: skip (TrainConfig checks each)
    results: dict[str, list[dict]] = {v.label: [] for v in variants}
    for (label, seed), job in jobs.items():
        t0 = time.perf_counter()
        summary = train(job)
        rows = read_metrics(summary["run_dir"])
        curve = [(r["step"], r["eval_reward"]) for r in rows if "eval_reward" in r]
        results[label].append({"seed": seed, "run_dir": summary["run_dir"], "eval": curve,
                               "seconds": time.perf_counter() - t0})  # fmt: skip
    (base / "compare.json").write_text(json.dumps(results, indent=1) + "\n")
    out = plot_compare({label: [r["run_dir"] for r in runs] for label, runs in results.items()},
                       base / "compare.png")  # fmt: skip
    print("\n".join(summary_lines(results)))
    print(f"gspo train --compare: wrote {out} and {base / 'compare.json'}")
    return 0


def summary_lines(results: dict[str, list[dict]]) -> list[str]:
    """One line per loss: held-out reward first / best / last, each as the mean over seeds
    with [min, max], and the mean seconds per run."""
    width = max(len(label) for label in results)
    lines = [f"{'loss':<{width}}  held-out reward, mean [min, max] over {_seeds(results)}"]
    for label, runs in results.items():
        cells = []
        for name, pick in (("first", lambda c: c[0][1]), ("best", lambda c: max(v for _, v in c)),
                           ("last", lambda c: c[-1][1])):  # fmt: skip
            values = [pick(r["eval"]) for r in runs]
            cells.append(f"{name} {statistics.fmean(values):.3f} "
                         f"[{min(values):.3f}, {max(values):.3f}]")  # fmt: skip
        seconds = statistics.fmean(r["seconds"] for r in runs)
        lines.append(f"{label:<{width}}  {'  '.join(cells)}  {seconds:.0f} s/run")
    return lines


def _seeds(results: dict[str, list[dict]]) -> str:
    seeds = [r["seed"] for r in next(iter(results.values()))]
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
