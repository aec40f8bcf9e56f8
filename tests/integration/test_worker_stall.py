"""A shard whose server accepts connections but never answers: the worker's default
driver timeouts end its connection attempts, and SIGTERM stops a worker stalled in a
pass."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = str(Path(__file__).resolve().parents[2])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not done.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    done.set()
    thread.join(5)
    for c in held:
        c.close()
    server.close()


def _worker(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "shardsession", "recover", "--config", str(config), "--watch",
         "--interval", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )


@pytest.mark.parametrize("url", ["postgresql+psycopg2://app:pw@127.0.0.1:{port}/x",
                                 "mysql+pymysql://app:pw@127.0.0.1:{port}/x"])
def test_worker_engines_time_out_on_a_silent_shard(
    tmp_path: Path, silent_port: int, url: str
) -> None:
    """The engines of ``status``/``recover`` give up connecting to a silent server (no
    timeout in the config: the CLI's defaults)."""
    from shardsession.cli.recover import _load_worker_cluster

    config = tmp_path / "c.toml"
    config.write_text(f'[shards.hang]\nurl = "{url.format(port=silent_port)}"\n')
    cluster = _load_worker_cluster(str(config))
    outcome: list[BaseException] = []

    def connect() -> None:
        try:
            cluster.engines["hang"].connect().close()
        except Exception as e:
            outcome.append(e)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(150)  # the defaults: 10 s to connect, 60 s for MySQL's handshake read
    cluster.dispose()
    assert outcome and "time" in str(outcome[0]).lower(), outcome


def test_sigterm_stops_a_worker_stalled_in_a_pass(tmp_path: Path, silent_port: int) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        f'[shards.good]\nurl = "sqlite:///{tmp_path / "good.db"}"\n'
        f'[shards.hang]\nurl = "postgresql+psycopg2://app:pw@127.0.0.1:{silent_port}/x"\n'
        "connect_args = { connect_timeout = 3600 }\n"  # the shard's own value wins
    )
    worker = _worker(config)
    try:
        time.sleep(3)
        assert worker.poll() is None, worker.communicate()
        worker.send_signal(signal.SIGTERM)
        _out, err = worker.communicate(timeout=60)  # STOP_WAIT is 5 s
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert worker.returncode == 1, err
    assert "did not end within" in err, err
