"""`python -m bench`: measure spot against raw COPY and cryptofeed; write the results.

    python -m bench                 3 runs of each figure (about 5 minutes on 2 cores)
    python -m bench --quick         1 run, small N (about a minute)
    python -m bench --memory-sizes 100k,1M,10M    add the 10M-message memory run (~2-3 min)

Results go to bench/results/latest.json and the table in docs/benchmarks.md (--no-doc: not).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.harness import ROOT, Plan, quick_plan, run_plan
from bench.report import markdown, update_doc


def _count(text: str) -> int:
    text = text.strip().lower().replace("_", "")
    for suffix, factor in (("k", 1_000), ("m", 1_000_000)):
        if text.endswith(suffix):
            return int(float(text[:-1]) * factor)
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="PostgreSQL (default: 127.0.0.1:5432/test, else embedded)")
    parser.add_argument("--quick", action="store_true", help="1 run of each, small N")
    parser.add_argument("--runs", type=int, help="runs per figure (median reported)")
    parser.add_argument("--messages", type=_count, help="messages per throughput run")
    parser.add_argument("--peer-messages", type=_count, help="messages per cryptofeed run")
    parser.add_argument("--memory-sizes", help="comma-separated, e.g. 100k,1M,10M")
    parser.add_argument("--latency-rate", type=int, help="offered messages/s (default 10000)")
    parser.add_argument("--latency-secs", type=float, help="seconds of paced sending")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args(argv)
    overrides = {
        name: value
        for name, value in {
            "dsn": args.dsn,
            "runs": args.runs,
            "messages": args.messages,
            "peer_messages": args.peer_messages,
            "latency_rate": args.latency_rate,
            "latency_secs": args.latency_secs,
            "memory_sizes": (
                tuple(_count(size) for size in args.memory_sizes.split(","))
                if args.memory_sizes
                else None
            ),
        }.items()
        if value is not None
    }
    plan = quick_plan(**overrides) if args.quick else Plan(**overrides)
    document = run_plan(plan)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    table = markdown(document)
    print(table)
    if not args.no_doc:
        update_doc(args.doc, table)
    print(f"\nwrote {args.output}" + ("" if args.no_doc else f" and {args.doc}"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
