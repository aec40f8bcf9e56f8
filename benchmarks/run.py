"""Side-by-side benchmarks: shardsession vs plain SQLAlchemy, in one process.

Usage::

    python benchmarks/run.py [--json PATH] [--rounds N] [SCENARIO ...]

Servers are found or started the same way the tests do (tests/harness/servers.py:
environment URLs, local binaries, or Docker). Every scenario interleaves rounds of ours and
the baseline and reports medians; ``ratio`` is ours / baseline (lower is better).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from benchmarks._env import BenchEnv  # noqa: E402

Scenario = Callable[[BenchEnv, int], dict[str, Any]]


def _scenarios() -> dict[str, Scenario]:
    from benchmarks import scenarios_routing

    found: dict[str, Scenario] = {
        "routing_flush_10k": scenarios_routing.routing_flush_10k,
        "single_shard_txn": scenarios_routing.single_shard_txn,
        "single_shard_txn_mariadb": scenarios_routing.single_shard_txn_mariadb,
    }
    for module_name, names in (
        ("benchmarks.scenarios_query", ("fanout_4shards_rtt5ms", "topk_merge")),
        ("benchmarks.scenarios_commit", ("commit_3shards_rtt2ms", "recovery_1000")),
        ("benchmarks.scenarios_bulk", ("bulk_insert_100k",)),
        ("benchmarks.scenarios_async", ("async_fanout_4shards_rtt5ms",)),
        ("benchmarks.scenarios_tenancy", ("tenant_request", "move_tenant_100k")),
        ("benchmarks.scenarios_contention", ("transfers_contended",)),
    ):
        try:
            module = __import__(module_name, fromlist=["x"])
        except ImportError:
            continue
        for name in names:
            fn = getattr(module, name, None)
            if fn is not None:
                found[name] = fn
    return found


def main(argv: list[str] | None = None) -> int:
    scenarios = _scenarios()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", nargs="*", help=f"any of: {', '.join(scenarios)}")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this file")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per side")
    args = parser.parse_args(argv)
    chosen = args.scenario or list(scenarios)
    unknown = [s for s in chosen if s not in scenarios]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; known: {list(scenarios)}")

    results: dict[str, dict[str, Any]] = {}
    with BenchEnv() as env:
        for name in chosen:
            t0 = time.perf_counter()
            res = scenarios[name](env, args.rounds)
            res.setdefault("ratio", res["ours"] / res["baseline"] if res.get("baseline") else None)
            results[name] = res
            print(f"# {name} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    print(f"{'scenario':28} {'ours (s)':>12} {'baseline (s)':>13} {'ratio':>7}  extra")
    for name, res in results.items():
        extra = {k: v for k, v in res.items() if k not in ("ours", "baseline", "ratio")}
        ratio = res.get("ratio")
        print(
            f"{name:28} {res['ours']:12.6f} {res.get('baseline') or 0:13.6f} "
            f"{'-' if ratio is None else format(ratio, '7.3f'):>7}  {json.dumps(extra)}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
