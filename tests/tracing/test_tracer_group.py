"""The tracer's own gloo group (`moeload.tracing.collective.tracer_group`) over a subgroup of the world, on 3
real gloo processes: ranks 0 and 1 trace with `group=` their subgroup, rank 2 only takes part in the groups'
creation. First with the same process groups on both members (the tracer makes its own group, at once), then
after a group [0, 2] that rank 1 is not in: torch names a locally synchronized group by its ranks and the
number of groups the rank belongs to, which now differ, so a group made there would wait for the timeout;
the tracer falls back to the training's subgroup at once (one warning). Counts are right in both."""

from __future__ import annotations

import json
import textwrap

from _shims import run_workers

WORKER = textwrap.dedent(
    """
    import json, sys, time, warnings
    import torch, torch.distributed as dist
    from torch import nn
    torch.set_num_threads(1)
    rank, path, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", rank=rank, world_size=3)
    from moeload import LoadTracer, open_trace

    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(8, 4)

        def forward(self, x):
            return {"expert_indices": self.gate(x).topk(2, dim=-1).indices}

    sub = dist.new_group([0, 1], backend="gloo")  # every rank calls new_group (global synchronization)
    res = {"rank": rank, "runs": []}
    for run in range(2):
        if run == 1:
            dist.new_group([0, 2], backend="gloo")  # rank 1 is not in it: the members' group counts differ
        if rank == 2:
            continue
        torch.manual_seed(run)
        model = nn.Module()
        model.moe = nn.Module()
        model.moe.router = Router()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.time()
            tr = LoadTracer(model, f"{path}{run}", gates="*.router", top_k=2, group=sub, flush_every=2, flush_timeout=60).start()
            made_s = time.time() - t0
            for s in range(3):
                model.moe.router(torch.randn(10, 8))
                tr.step()
            tr.close()
        res["runs"].append({"made_s": made_s, "own_group": tr._cpu_pg is not sub,
                            "warnings": [str(w.message) for w in caught if "tracer process group" in str(w.message)],
                            "counts": open_trace(f"{path}{run}").counts().sum(-1).tolist() if rank == 0 else None})
    open(out, "w").write(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()
    """
)


def test_subgroup_tracer_group_is_made_at_once_or_falls_back_at_once(tmp_path):
    outs = [tmp_path / f"rank{r}.json" for r in range(3)]
    run_workers(tmp_path, WORKER, 3, lambda r: [str(tmp_path / "t"), str(outs[r])], timeout=150)
    res = [json.loads(o.read_text()) for o in outs]
    for r in res[:2]:
        same, differ = r["runs"]
        assert same["own_group"] and same["warnings"] == [] and same["made_s"] < 30, same
        assert not differ["own_group"] and differ["made_s"] < 30, differ
        assert len(differ["warnings"]) == 1 and "different numbers of process groups" in differ["warnings"][0]
    for run in res[0]["runs"]:  # global counts: both ranks' 10 tokens x top-2, every step
        assert run["counts"] == [[40], [40], [40]], run["counts"]
    assert res[2]["runs"] == []
