"""Where a step's rollouts come from: sampled now (synchronous), or generated ahead by a
sampler thread while the trainer updates (``--async-rollouts``, one step off-policy).

The loop sees one interface, built once by ``build``:

    ahead = source.next(step)               # step's Rollout, its policy_lag, the wait
    ... rewards, advantages, update ...
    source.updated(step)                    # the new weights into the sampler
    source.evaluate(prompts)                # greedy held-out samples of the current weights
    source.pending(step)                    # what a checkpoint after ``step`` must keep

Synchronous: batch k is sampled by W_{k-1}, the weights after step k-1 (W_0 = the initial
ones), so ``policy_lag`` is 0.

Asynchronous, with S = ``--max-staleness``: batch k is sampled by W_{max(0, k-1-S)}, so
its ``policy_lag`` (updates between the sampler's weights and the trainer's when it trains on
it) is min(k-1, S): 0 for the first batch of a fresh run, S from step S+1 on. Schedule:
right after step k's update the trainer waits until the sampler thread is idle (batch k+S is
then done), loads W_k into the sampler (on this thread: FSDP2's gathers are collectives and
the engine is not thread-safe), and hands the thread batch k+1+S, which it generates while
the trainer scores and updates on batch k+1. One generation is in flight at a time; S > 1
only adds lag (and absorbs nothing), S = 1 is the useful setting.

Determinism: every asynchronous batch is drawn from its own seed (the step number, offset
per rank by the engine), not the process's running RNG, which the trainer thread uses
meanwhile. A checkpoint after step k keeps the finished batches k+1 .. k+S (``pending``; each rank
its own share, so they are used only when resuming on as many ranks);
the one in flight, k+1+S, was drawn by W_k, the checkpoint's own weights, and is drawn
again on resume from its seed. A resumed run therefore equals a straight one.

The sampler needs weights of its own: vLLM holds its own copy; the HF engine samples the
policy module itself, which the trainer changes under it, so it gets a copy (``detach``),
refreshed by ``updated``. The thread overlaps for real when the two sides do not compete:
a GPU each, or free CPU cores; torch releases the GIL in its kernels, vLLM's scheduler is
Python and does not.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gspo.train.rewards import RewardError
from gspo.train.rollout import Rollout


@dataclass
class Ahead:
    """A step's rollout as the source hands it over: generated ahead by the sampler thread,
    or None (sampled by the loop now). Named apart from gspo.train.sampling.Batch, the
    step's batch with rewards and ``keep``, which the loop builds from this one."""

    rollout: Rollout | None  # None: sample it now (synchronous)
    lag: int  # policy_lag: trainer updates between the sampler's weights and the trainer's
    wait: float  # seconds the trainer waited for it (time_rollout)
    # a reward or environment error of the sampler thread: raised where the loop asks for
    # the rollout (inside its guard, which checkpoints and exits 3 as a synchronous run does)
    error: RewardError | None = None


def build(run, sampler, policy, world, *, prompts_of: Callable[[int], list],
          episodes_of: Callable, resumed: dict | None = None, start: int = 0):  # fmt: skip
    """The run's rollout source. ``run``: the RunConfig (--async-rollouts, --max-staleness,
    the group size and seed); ``prompts_of(step)``: this rank's prompts of that step;
    ``episodes_of(sampler=engine)``: the run's episodes (gspo.train.episodes) on an engine,
    single-turn or --env's; ``resumed``: ``pending`` of the checkpoint resumed from (after
    step ``start``)."""
    if not run.async_rollouts:
        return Synchronous(sampler, policy, prompts_of, group_size=run.group_size)
    if getattr(sampler, "shares_policy", False):  # HF: sample a copy, not the moving module
        sampler = sampler.detach(seed=run.seed + 7919 * world.rank)
    return Overlapped(sampler, episodes_of(sampler=sampler), policy, prompts_of,
                      group_size=run.group_size,
                      staleness=run.max_staleness, resumed=resumed or {}, start=start,
                      world_size=world.size)  # fmt: skip


class Synchronous:
    """Sample the step's prompts when the step asks, with the current weights: ``next`` and
    ``evaluate`` hand back nothing, and the loop samples now (``or_now``: through
    gspo.train.episodes, so --env and --dynamic-sampling's rounds work as they do)."""

    def __init__(self, sampler, policy, prompts_of, *, group_size: int):
        self.sampler, self.policy, self.prompts_of = sampler, policy, prompts_of
        self.group_size = group_size

    def next(self, step: int) -> Ahead:
        return Ahead(None, 0, 0.0)

    def updated(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        self.sampler.load_weights(self.policy.sampler_weights())
        return {"time_weight_sync": time.perf_counter() - t0}

    def evaluate(self, prompts: list) -> Rollout | None:
        return None

    def pending(self, step: int) -> dict:
        return {}

    def close(self) -> None:
        pass


def or_now(ahead: Ahead | Rollout | None, now: Callable[..., Rollout]) -> Callable[..., Rollout]:
    """The ``sample(prompts, group_size=, greedy=)`` of a step: the rollout generated ahead
    (for exactly these prompts), or ``now`` when there is none (synchronous runs)."""
    rollout = ahead.rollout if isinstance(ahead, Ahead) else ahead
    if isinstance(ahead, Ahead) and ahead.error is not None:

        def failed(prompts, *, group_size: int, greedy: bool) -> Rollout:
            raise ahead.error

        return failed
    if rollout is None:
        return now

    def generated(prompts, *, group_size: int, greedy: bool) -> Rollout:
        if len(rollout) != len(prompts) * group_size:
            raise RuntimeError(f"the batch generated ahead has {len(rollout)} rows for "
                               f"{len(prompts)} x {group_size} asked")  # fmt: skip
        return rollout

    return generated


def evaluation(source, now: Callable[..., Rollout], prompts, *, group_size: int,
               greedy: bool) -> Rollout:  # fmt: skip
    """The held-out rollout of ``prompts``: the source's (which waits for its sampler thread
    and uses its engine) or ``now``'s (synchronous runs)."""
    return or_now(source.evaluate(prompts), now)(prompts, group_size=group_size, greedy=greedy)


class Overlapped:
    """A sampler thread that generates batch k+1+S while the trainer works on batch k+1
    (module docstring). Every call is made from the trainer's thread."""

    def __init__(self, sampler, episodes, policy, prompts_of, *, group_size: int,
                 staleness: int, resumed: dict, start: int, world_size: int = 1):  # fmt: skip
        """``episodes``: what the thread runs on ``sampler`` (gspo.train.episodes: one
        completion per sequence, or an environment's episodes, rewards included)."""
        self.sampler, self.policy, self.prompts_of = sampler, policy, prompts_of
        self.episodes = episodes
        self.group_size, self.staleness = group_size, staleness
        self.ready: dict[int, tuple[Rollout, int]] = {}  # step -> (rollout, weights' version)
        # Saved on another number of ranks, a batch holds another share of the prompts:
        # then they are drawn again, from the checkpoint's weights (policy_lag 0 for them).
        self.world_size = world_size
        if resumed.get("world_size") == world_size:
            self.ready.update({int(k): (r, int(v)) for k, (r, v) in resumed["batches"].items()})
        self.version = start  # the sampler holds W_start (built from it)
        self.error: BaseException | None = None
        self.idle_time = 0.0  # seconds the sampler thread waited for work
        self._work: list[int] = []
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._serve, name="gspo-sampler", daemon=True)
        self._thread.start()
        # Fresh: batches 1 .. S+1 from W_0. Resumed after step k: k+1 .. k+S were saved,
        # k+1+S is drawn again from W_k (the weights the engine was built from).
        for step in range(start + 1, start + 2 + staleness):
            if step not in self.ready:
                self._submit(step)

    # ---- the trainer's side

    def next(self, step: int) -> Ahead:
        t0 = time.perf_counter()
        with self._cond:
            self._cond.wait_for(lambda: step in self.ready or self.error is not None)
            if step not in self.ready and isinstance(self.error, RewardError):
                return Ahead(None, 0, time.perf_counter() - t0, error=self.error)
            self._raise()
            rollout, version = self.ready[step]
        return Ahead(rollout, (step - 1) - version, time.perf_counter() - t0)

    def updated(self, step: int) -> dict[str, float]:
        """W_step into the sampler once it is idle, then batch step+1+S to generate."""
        t0 = time.perf_counter()
        self._drain()
        waited = time.perf_counter() - t0
        self.sampler.load_weights(self.policy.sampler_weights())
        self.version = step
        with self._cond:
            for done in [k for k in self.ready if k <= step]:
                del self.ready[done]
            idle, self.idle_time = self.idle_time, 0.0
        self._submit(step + 1 + self.staleness)
        return {"time_weight_sync": time.perf_counter() - t0 - waited,
                "time_wait_sampler": waited, "time_sampler_idle": idle}  # fmt: skip

    def evaluate(self, prompts: list) -> Rollout:
        self._drain()  # the engine is not thread-safe; it holds the current weights
        return self.episodes.rollout(prompts, group_size=1, greedy=True)

    def pending(self, step: int) -> dict:
        """The finished batches a resume after ``step`` needs: ``{"world_size": ranks,
        "batches": {k: (rollout, version)}}``."""
        with self._cond:
            batches = {k: v for k, v in self.ready.items() if step < k <= step + self.staleness}
        return {"world_size": self.world_size, "batches": batches}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _submit(self, step: int) -> None:
        with self._cond:
            self._work.append(step)
            self._cond.notify_all()

    def _drain(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not (self._work or self._busy) or self.error is not None)
            self._raise()

    def _raise(self) -> None:
        # a reward or environment error is handed to the loop by ``next`` (Ahead.error)
        if self.error is not None and not isinstance(self.error, RewardError):
            raise RuntimeError("the sampler thread failed (its error above)") from self.error

    # ---- the sampler thread

    def _serve(self) -> None:
        # OpenMP's thread count is per thread: a new one starts at the machine's default,
        # and vLLM's CPU attention refuses metadata built for another count (measured:
        # "thread_num == thread_num (2 vs. 1)"). Use the trainer's setting.
        torch.set_num_threads(self._threads)
        while True:
            t0 = time.perf_counter()
            with self._cond:
                self._cond.wait_for(lambda: self._work or self._closed)
                if self._closed:
                    return
                step, self._busy = self._work.pop(0), True
                self.idle_time += time.perf_counter() - t0
                version = self.version
            try:
                rollout = self.episodes.rollout(self.prompts_of(step), greedy=False,
                                                group_size=self.group_size, seed=step)  # fmt: skip
            except BaseException as err:  # noqa: BLE001 - re-raised on the trainer's thread
                with self._cond:
                    self.error, self._busy = err, False
                    self._cond.notify_all()
                return
            with self._cond:
                self.ready[step] = (rollout, version)
                self._busy = False
                self._cond.notify_all()
