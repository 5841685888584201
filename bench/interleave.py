"""A ratio of two loads on one gateway, alternated every fraction of a second: less noise.

The paired rounds of ``bench/run.py`` load side A for 2 s, then side B for 2 s; on a shared VM
the machine's speed moves between those two windows, and one round's ratio has a standard
deviation of ~12%. Here both sides' wrk processes run for the whole round and take turns:
each is resumed (SIGCONT) for one slice while the other is stopped (SIGSTOP), N slices each,
so both see the same machine within a fraction of a second. A round's ratio is the requests
of A over those of B (equal running times), and the figure is the median of the rounds.

    .venv/bin/python bench/interleave.py                 # cache miss vs no cache, ~2.5 min
    .venv/bin/python bench/interleave.py --pair same     # A/A: the method's own error

Bias: when a side is stopped, the gateway still finishes its ~50 requests in flight (~11 ms
at 4,500 req/s) inside the other side's slice. That spill pulls the ratio towards 1 (model:
measured cost ≈ true cost · (1 − 2·50 / (slice · req/s)), ~4% of the cost for 0.5 s slices,
~20% for 0.1 s): keep slices long next to that.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import Bench, Target, Timing, chat_body  # noqa: E402
from bench.report import Results, median_error  # noqa: E402
from bench.upstream import nginx_upstream  # noqa: E402
from bench.variants import CACHE_MISS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "interleave.json"
# pair -> (its gateway, model of side A, model of side B); every body is unique
PAIRS = {
    "cache-miss": (CACHE_MISS, "bench-json", "bench-cached"),
    "same": (CACHE_MISS, "bench-json", "bench-json"),
}


def summarize(ratios: Sequence[float]) -> dict[str, float]:
    """Median cost (A/B − 1) of the rounds, their standard deviation, and the standard error of
    the median (0 below 3 rounds)."""
    sd = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
    return {"cost": statistics.median(ratios) - 1, "round_sd": sd,
            "error": median_error(ratios)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pair", choices=list(PAIRS), default="cache-miss")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=10,
                        help="running time of each side per round")
    parser.add_argument("--slice", type=float, default=0.5, dest="slice_seconds",
                        help="seconds per turn (see the bias in the module docstring)")
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args(argv)
    spec, model_a, model_b = PAIRS[args.pair]
    slices = max(1, round(args.seconds / args.slice_seconds))
    # warm-up: half a round, which fills the cache to its bound
    timing = Timing(seconds=0, warmup=max(1, round(args.seconds / 2)), rounds=args.rounds,
                    round_seconds=0, turns=slices, turn_seconds=args.slice_seconds)
    workdir = Path(tempfile.mkdtemp(prefix="gw-interleave-"))
    results = Results()
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        upstream = stack.enter_context(nginx_upstream(workdir))
        bench = Bench(timing, workdir, upstream, stack, results)
        gateway = stack.enter_context(bench.gateway(spec))
        side_a, side_b = (Target(side, model, gateway.chat_url, chat_body(model, unique=True),
                                 server_pid=gateway.pid, unique=True,
                                 authorization=gateway.authorization)
                          for side, model in (("A", model_a), ("B", model_b)))
        bench.interleaved(side_a, side_b, args.connections)
    running = slices * args.slice_seconds
    rounds = [{"a": round(a * running), "b": round(b * running), "ratio": a / b}
              for a, b in zip(results.rows["A"].rounds, results.rows["B"].rounds, strict=True)]
    figure = summarize([r["ratio"] for r in rounds])
    print(f"\n{args.pair}: B costs {figure['cost']:+.2%} ±{figure['error']:.2%} over A "
          f"(median of {len(rounds)} rounds; one round's sd {figure['round_sd']:.2%}; "
          f"{args.slice_seconds:g} s slices, {slices} per side per round)")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"pair": args.pair, "models": [model_a, model_b],
                                   "slice_seconds": args.slice_seconds, "slices": slices,
                                   "connections": args.connections, "rounds": rounds,
                                   **figure}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
