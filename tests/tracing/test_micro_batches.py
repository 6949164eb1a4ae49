"""LoadTracer(per_micro_batch=True): the m-th training forward of each gate in a step is micro-batch m;
`Trace.micro_batch_counts()` gives [S, M, L, E] (and per rank on 2 gloo processes), summing to the step
counts; more forwards than max_micro_batches stop the micro-batch rows, never the exact step totals.
"""

from __future__ import annotations

import json
import os
import textwrap
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from moeload import LoadTracer, open_trace
from moeload.errors import InputError, TraceFormatError

E, K, D = 6, 2, 8
MICRO = [3, 1, 4, 2, 3]  # micro-batches of each step


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(D, D) for _ in range(2)])
        self.gates = nn.ModuleList([nn.Linear(D, E) for _ in range(2)])
        self.seen: list[list[np.ndarray]] = [[], []]

    def forward(self, x):
        for i, (b, g) in enumerate(zip(self.blocks, self.gates)):
            idx = g(x).topk(K, dim=-1).indices
            self.seen[i].append(torch.bincount(idx.flatten(), minlength=E).numpy())
            x = torch.tanh(b(x))
        return x.pow(2).mean()


def train(model: Net, tracer: LoadTracer, micro: list[int], gen: torch.Generator) -> np.ndarray:
    """-> [S, M_max, L, E] the test's own counts per micro-batch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    want = np.zeros((len(micro), max(micro), 2, E), np.int64)
    for s, n in enumerate(micro):
        for m in range(n):
            model.seen = [[], []]
            (model(torch.randn(10 + m, D, generator=gen)) / n).backward()
            want[s, m] = [model.seen[0][0], model.seen[1][0]]
        opt.step()
        opt.zero_grad()
        tracer.step()
    return want


def test_micro_batch_rows_add_up_to_the_step(tmp_path):
    torch.manual_seed(0)
    model = Net()
    tracer = LoadTracer(model, tmp_path / "t", flush_every=2, gates="gates.*", top_k=K, per_micro_batch=True)
    with tracer:
        want = train(model, tracer, MICRO, torch.Generator().manual_seed(1))
    t = open_trace(tmp_path / "t")
    mb = t.micro_batch_counts()
    assert mb.shape == (5, 4, 2, E)
    np.testing.assert_array_equal(mb, want)
    np.testing.assert_array_equal(mb.sum(1), t.counts())
    np.testing.assert_array_equal(t.counts().sum(-1)[:, 0], [K * sum(10 + m for m in range(n)) for n in MICRO])
    np.testing.assert_array_equal(t.micro_batch_counts(steps=[1], layers=[1]), want[1:2, :1, 1:2])  # M of the selection
    assert t.meta["extra"]["per_micro_batch"] == {"max_micro_batches": 16}


def test_more_forwards_than_slots_stop_the_rows_not_the_totals(tmp_path):
    torch.manual_seed(0)
    model = Net()
    tracer = LoadTracer(model, tmp_path / "t", flush_every=2, gates="gates.*", top_k=K, per_micro_batch=True,
                        max_micro_batches=3)
    with warnings.catch_warnings(record=True) as w, tracer:
        warnings.simplefilter("always")
        want = train(model, tracer, MICRO, torch.Generator().manual_seed(1))
    assert [str(x.message) for x in w if "micro-batch rows stop at step 2" in str(x.message)]
    t = open_trace(tmp_path / "t")
    np.testing.assert_array_equal(t.counts(), want.sum(1))  # exact, the 4-micro-batch step included
    np.testing.assert_array_equal(t.micro_batch_counts(steps=slice(0, 2)), want[:2, :3])
    with pytest.raises(TraceFormatError, match=r"steps 2\.\.3 have no micro-batch rows \(micro-batch rows stopped at step 2: .*max_micro_batches=3"):
        t.micro_batch_counts()
    assert t.meta["extra"]["micro_batches_stopped"]["step"] == 2


def test_refusals(tmp_path):
    model = Net()
    with pytest.raises(InputError, match="max_micro_batches=0"):
        LoadTracer(model, tmp_path / "a", gates="gates.*", top_k=K, per_micro_batch=True, max_micro_batches=0)
    with pytest.raises(InputError, match="needs .* GiB of device buffers"):
        LoadTracer(model, tmp_path / "b", gates="gates.*", top_k=K, per_micro_batch=True, max_micro_batches=4096,
                   flush_every=100_000).start()
    with LoadTracer(model, tmp_path / "c", gates="gates.*", top_k=K) as tr:
        model(torch.randn(4, D))
        tr.step()
    with pytest.raises(TraceFormatError, match="recorded without micro-batch rows"):
        open_trace(tmp_path / "c").micro_batch_counts()


WORKER = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch, torch.distributed as dist
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[3])
    from test_micro_batches import Net, train
    from moeload import LoadTracer
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = Net()
    micro = [2, 3, 1] if rank == 0 else [2, 3, 1]
    with LoadTracer(model, sys.argv[2], flush_every=2, gates="gates.*", top_k=2, per_micro_batch=True) as tr:
        want = train(model, tr, micro, torch.Generator().manual_seed(10 + rank))
    open(sys.argv[2] + f".{rank}.json", "w").write(json.dumps(want.tolist()))
    dist.barrier()
    dist.destroy_process_group()  # gloo's threads joined before exit (else an abort at interpreter exit)
    """
)


def test_two_ranks_per_rank_micro_batches(tmp_path):
    from _shims import run_workers

    run_workers(tmp_path, WORKER, 2, lambda r: [str(tmp_path / "t"), os.path.dirname(os.path.abspath(__file__))])
    want = np.stack([np.array(json.loads((tmp_path / f"t.{r}.json").read_text())) for r in range(2)], axis=1)
    t = open_trace(tmp_path / "t")
    per = t.micro_batch_counts(per_rank=True)  # [S, R, M, L, E]
    np.testing.assert_array_equal(per, want)
    np.testing.assert_array_equal(t.micro_batch_counts(), want.sum(1))
    np.testing.assert_array_equal(per.sum(2), t.rank_counts())
    assert not np.array_equal(per[:, 0], per[:, 1])


def test_step_from_another_thread_is_refused(tmp_path):
    import threading

    model = Net()
    errors = []
    with LoadTracer(model, tmp_path / "t", gates="gates.*", top_k=K) as tr:
        model(torch.randn(4, D))

        def other():
            try:
                tr.step()
            except InputError as e:
                errors.append(str(e))

        tr.step()  # the first step binds the tracer to this thread
        th = threading.Thread(target=other, name="loader")
        th.start()
        th.join()
        tr.step()  # this thread still steps it
    assert len(errors) == 1 and "from thread 'loader'" in errors[0]
    assert open_trace(tmp_path / "t").steps.tolist() == [0, 1]
