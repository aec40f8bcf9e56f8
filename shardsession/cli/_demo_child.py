"""The demo's crashing process: moves 25 between two customers on different shards and
kills itself (SIGKILL) at a named point of the commit. Run by ``shardsession demo``:
``python -m shardsession.cli._demo_child '<json>'`` with ``folder`` (the embedded SQLite
cluster) or ``config`` (a cluster file), ``a``, ``b`` and ``crash`` (``before_commit``, or
a step of the commit protocol such as ``after_all_prepared``)."""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

from sqlalchemy.orm import sessionmaker

from ..coordinator import TransactionCoordinator
from ..coordinator.local import local_sqlite_cluster
from ..session import ShardedSession
from ._common import load_cluster
from .demo import SHARDS, Customer, placement


def main(spec: dict[str, Any]) -> None:
    point = spec["crash"]

    def crash(step: str) -> None:
        if step == point:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    if "folder" in spec:
        cluster = local_sqlite_cluster(spec["folder"], SHARDS)
    else:
        cluster = load_cluster(spec["config"])
    coordinator = TransactionCoordinator(atomic="require", crash_point=crash)
    Session = sessionmaker(class_=ShardedSession, shards=cluster.engines,
                           placement=placement(), coordinator=coordinator)
    with Session() as s:
        ca, cb = s.get(Customer, spec["a"]), s.get(Customer, spec["b"])
        assert ca is not None and cb is not None
        ca.balance -= 25
        cb.balance += 25
        s.flush()
        crash("before_commit")
        s.commit()
    print("committed: the crash point was never reached")


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
