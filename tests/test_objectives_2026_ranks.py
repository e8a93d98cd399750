"""VESPO, LUSPO and DPPO in the trainer's fast step: 2 gloo ranks (DDP), each holding whole
groups that share their prompts, run packed (--shared-prefix) with the fused loss and
micro-batches; the update step equals one process on the whole batch through the plain path
(--no-shared-prefix --no-fused-loss, no micro-batches), to 1e-6 in float32. The step is SGD
at lr 1 after the gradient-norm clip (0.05), so parameters move by the clipped gradient
itself: AdamW's first steps divide a tiny gradient by its own size, which turns float32
rounding into differences of 3e-5 (measured for LUSPO) and hides nothing a test could see. VESPO divides by
the minibatch's valid tokens over every micro-batch and rank: a rank or a piece that divided
by its own count would weight short answers up. (The pattern of
tests/test_prefix_distributed.py, whose batch and helpers these are.)"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from gspo.train.config import TrainConfig
from test_prefix_distributed import UPDATE, B, _single, free_port, make_batch
from test_prefix_distributed import updated as prefix_updated

LOSSES = ("vespo", "luspo", "dppo-tv")
FAST = dict(UPDATE, lr=1.0)  # two minibatches, micro-batches of 30 tokens
PLAIN = dict(FAST, max_tokens_per_microbatch=0, shared_prefix=False, fused_loss=False)


def updated(model, engine, rows, world, config):
    """The parameters after update() with SGD (module docstring)."""
    return prefix_updated(model, engine, rows, world, config, optimizer=torch.optim.SGD)


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    from gspo.causal_lm import CausalLMLogprobs
    from gspo.train import distributed as dd

    world = dd.init("cpu")
    rows = slice(rank * B // world_size, (rank + 1) * B // world_size)
    results = {}
    for loss in LOSSES:
        model = make_batch()[0]
        engine = dd.wrap(CausalLMLogprobs(model), world, fsdp=False)
        results[loss] = updated(model, engine, rows, world, TrainConfig(**FAST, loss=loss))
    if rank == 0:
        torch.save(results, out)
    dd.shutdown(world)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("objectives") / "states.pt"
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return torch.load(out)


@pytest.mark.parametrize("loss", LOSSES)
def test_two_ranks_packed_fused_microbatched_take_the_single_process_step(two_ranks, loss):
    from gspo.causal_lm import CausalLMLogprobs

    model = make_batch()[0]
    # rank r holds rows 8r..8r+7 and its minibatch k is rows 8r+4k..+3: the single process
    # sees each global minibatch (both ranks' slices) as one slice
    order = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15])
    expected = updated(model, CausalLMLogprobs(model), order, _single(),
                       TrainConfig(**PLAIN, loss=loss))  # fmt: skip
    start = make_batch()[0].state_dict()
    assert max((expected[n] - start[n]).abs().max() for n in expected) > 1e-3  # it moved
    for name, value in expected.items():
        torch.testing.assert_close(two_ranks[loss][name], value, rtol=0, atol=1e-6, msg=name)
