"""Child coordinator for crash tests: runs one cross-shard transaction and SIGKILLs itself.

Usage: python _2pc_child.py '<json>' where json = {"urls": {shard: url}, "crash": point,
"key": int, "mode": "commit" | "recover"}. Each shard has a table ``ss_rows_<shard>``.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine
from sqlalchemy.orm import Session

from shardsession.coordinator import TransactionCoordinator, recover


def tables(names: list[str]) -> tuple[MetaData, dict[str, Table]]:
    md = MetaData()
    return md, {
        n: Table(f"ss_rows_{n}", md, Column("id", Integer, primary_key=True),
                 Column("v", String(20)))
        for n in names
    }


def main() -> None:
    cfg = json.loads(sys.argv[1])
    point = cfg["crash"]

    def crash(step: str) -> None:
        if step == point or step.split(":")[0] == point:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    engines = {n: create_engine(u) for n, u in cfg["urls"].items()}
    if cfg.get("mode") == "recover":
        recover(engines, grace_period=0, crash_point=crash)
        print("recovered")
        return
    names = list(engines)
    _md, tbl = tables(names)
    coord = TransactionCoordinator(atomic="require", crash_point=crash)
    by_engine = {e: n for n, e in engines.items()}
    s = Session()
    coord.install(s, by_engine.__getitem__)
    for n in names:
        s.connection(bind_arguments={"bind": engines[n]}).execute(
            tbl[n].insert().values(id=cfg["key"], v="x")
        )
    if point == "during_writes":
        crash(point)
    s.commit()
    print("committed")


if __name__ == "__main__":
    main()
