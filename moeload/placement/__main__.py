"""`python -m moeload.placement TRACE`: replay a trace under the standard placement scenarios."""

from __future__ import annotations

from moeload.placement.replay import compare


def main(argv: list[str] | None = None) -> None:
    """`python -m moeload.placement TRACE --gpus 4 --extra-per-gpu 1`: print `compare`'s table."""
    import argparse

    from moeload.trace import open_trace

    ap = argparse.ArgumentParser(prog="python -m moeload.placement", description=(compare.__doc__ or "").partition("\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--extra-per-gpu", type=int, default=1)
    ap.add_argument("--replan-every", type=int, default=100)
    ap.add_argument("--window", type=int, default=1000)
    ap.add_argument("--skip", type=int, default=0, help="leading steps to drop (e.g. warm-up)")
    args = ap.parse_args(argv)
    counts = open_trace(args.trace).counts()[args.skip :]
    table = compare(counts, args.gpus, counts.shape[2] + args.extra_per_gpu * args.gpus,
                    replan_every=args.replan_every, window=args.window)
    print(f"{args.trace}: counts {counts.shape}, {args.gpus} GPUs, +{args.extra_per_gpu} slot(s) per GPU")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))


if __name__ == "__main__":
    main()
