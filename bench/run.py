"""``make bench``: the gateway under wrk load in front of nginx serving fixed upstream bodies.

Starts nginx (and a throw-away redis-server when a Redis variant runs), one gateway process
per variant, drives each with ``wrk -t1``, prints one table plus the targets, and writes
``bench/results/last.json``. ``--quick`` for a smoke run, ``--only NAME`` for one variant.
See ``bench/README.md`` for how to read the output.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import FULL, QUICK, Bench  # noqa: E402
from bench.processes import BenchProcessError  # noqa: E402
from bench.report import Results, machine, render, verdicts, write_json  # noqa: E402
from bench.upstream import nginx_upstream  # noqa: E402
from bench.wrk import wrk_binary, wrk_version  # noqa: E402

VARIANTS = ("core", "limits-memory", "limits-redis", "cache-hit", "cache-miss", "sink",
            "nuclia")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def run_selected(bench: Bench, selected: list[str]) -> None:
    from bench import variants

    for name in selected:
        print(f"[{name}]", flush=True)
        getattr(variants, "run_" + name.replace("-", "_"))(bench)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 s per measurement, 1 s warm-up")
    parser.add_argument("--only", action="append", choices=VARIANTS, metavar="NAME",
                        help=f"run only this variant (repeatable): {', '.join(VARIANTS)}")
    parser.add_argument("--rounds", type=int, metavar="N",
                        help=f"rounds of each paired comparison (default {FULL.rounds}): more "
                             "rounds narrow a ratio's noise on a busy machine")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when a target FAILs or cannot be measured")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    # also when started with SIGINT ignored (`cmd &` in a script): Ctrl-C must clean up
    signal.signal(signal.SIGINT, signal.default_int_handler)
    timing = QUICK if args.quick else FULL
    if args.rounds:
        timing = replace(timing, rounds=args.rounds)
    selected = [v for v in VARIANTS if not args.only or v in args.only]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = Results(meta={"started": stamp, "quick": args.quick, "variants": selected,
                            "timing": timing.__dict__, "machine": machine()})
    try:
        wrk_binary()
        results.meta["wrk"] = wrk_version()
    except BenchProcessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    interrupted = False
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gw-bench-") as tmp, ExitStack() as stack:
        try:
            upstream = stack.enter_context(nginx_upstream(Path(tmp)))
            print(f"fake upstream: nginx at {upstream.url}", flush=True)
            bench = Bench(timing, Path(tmp), upstream, stack, results)
            run_selected(bench, selected)
        except KeyboardInterrupt:
            interrupted = True
            print("\ninterrupted: stopping every process", file=sys.stderr, flush=True)
        except BenchProcessError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    results.meta["elapsed_s"] = round(time.monotonic() - started, 1)
    print()
    print(render(results))
    if results.rows:
        path = write_json(results, RESULTS_DIR, stamp)
        print(f"\nresults: {path} (elapsed {results.meta['elapsed_s']} s)")
    if interrupted:
        return 130
    if args.strict:
        return 0 if all(v.passed for v in verdicts(results)) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
