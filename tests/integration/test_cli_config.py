"""The ``shardsession`` command as a script sees it: config lookup, relative paths,
``url_env``, argument checks, ``--json``, ``--version``, watch-mode timestamps, exit
codes, and no password in any output."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import servers

ROOT = str(Path(__file__).resolve().parents[2])
SECRET = "pw-Zq81x"


def run(
    *args: str, cwd: Path | str = ROOT, env: dict[str, str] | None = None, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "SHARDSESSION_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "shardsession", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**base, "PYTHONPATH": ROOT, **(env or {})},
    )


def sqlite_config(folder: Path, names: tuple[str, ...] = ("a", "b")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cluster.toml"
    path.write_text("".join(f'[shards.{n}]\nurl = "sqlite:///{n}.db"\n\n' for n in names))
    return path


def test_version() -> None:
    proc = run("--version")
    assert proc.returncode == 0
    assert re.fullmatch(r"shardsession \S+.*\n", proc.stdout), proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("recover", "--watch", "--interval", "0"), "--interval: must be a number of seconds"),
        (("recover", "--watch", "--interval", "-1"), "--interval: must be a number of seconds"),
        (("recover", "--interval", "nan"), "--interval: not a finite number"),
        (("recover", "--grace", "-1"), "--grace: must be a number of seconds >= 0"),
        (("recover", "--grace", "soon"), "--grace: not a number"),
        (("recover", "--watch", "--interval", "1e-9"), "--interval: must be a number of "
         "seconds >= 0.05"),
    ],
)
def test_bad_interval_and_grace_are_refused(tmp_path: Path, args: tuple[str, ...],
                                             message: str) -> None:
    config = sqlite_config(tmp_path)
    proc = run(*args, "--config", str(config))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "a.db").exists()  # refused before anything was touched


def test_relative_sqlite_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    config = sqlite_config(tmp_path / "conf")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run("create-all", "--config", "../conf/cluster.toml", cwd=elsewhere)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (config.parent / "a.db").exists() and (config.parent / "b.db").exists()
    assert list(elsewhere.iterdir()) == []


def test_config_from_environment_and_none_given(tmp_path: Path) -> None:
    config = sqlite_config(tmp_path)
    proc = run("status", env={"SHARDSESSION_CONFIG": str(config)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no in-doubt transactions" in proc.stdout
    missing = run("status")
    assert missing.returncode == 2
    assert "give --config FILE or set SHARDSESSION_CONFIG" in missing.stderr


def test_url_env(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[shards.a]\nurl_env = "SS_TEST_URL_A"\n')
    url = f"sqlite:///{tmp_path / 'from_env.db'}"
    ok = run("create-all", "--config", str(config), env={"SS_TEST_URL_A": url})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert (tmp_path / "from_env.db").exists()
    unset = run("status", "--config", str(config))
    assert unset.returncode == 2
    assert "url_env = 'SS_TEST_URL_A': that environment variable is not set" in unset.stderr
    both = tmp_path / "both.toml"
    both.write_text('[shards.a]\nurl = "sqlite://"\nurl_env = "X"\n')
    assert "has both url and url_env" in run("status", "--config", str(both)).stderr


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("not a url", "not a database URL: not a url"),
        (f"postgresql+psycopg2//app:{SECRET}@db/x", "not a database URL: "
         "postgresql+psycopg2//app:***@db/x"),
        (f"postgresql+pg8000://app:{SECRET}@db/x", "the driver 'pg8000' that "
         "postgresql+pg8000 names is not installed"),
    ],
)
def test_bad_urls_are_shown_masked(tmp_path: Path, url: str, shown: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[shards.a]\nurl = "{url}"\n')
    proc = run("status", "--config", str(config))
    assert proc.returncode == 2 and shown in proc.stderr, proc.stderr
    assert SECRET not in proc.stdout + proc.stderr


def test_missing_driver_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['pymysql'] = None\n"
        "from shardsession.config import Cluster\n"
        "try:\n"
        f"    Cluster({{'a': 'mysql+pymysql://app:{SECRET}@db/x'}})\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=60)
    assert "ConfigurationError" in proc.stdout, proc.stdout + proc.stderr
    assert "pip install 'shardsession[mysql]'" in proc.stdout
    assert SECRET not in proc.stdout


def test_unreachable_server_password_never_printed(tmp_path: Path) -> None:
    port = servers.free_port()
    config = tmp_path / "c.toml"
    config.write_text(
        f'[shards.a]\nurl = "sqlite:///{tmp_path / "a.db"}"\n'
        f'[shards.gone]\nurl = "postgresql+psycopg2://app:{SECRET}@127.0.0.1:{port}/x"\n'
        'connect_args = { connect_timeout = 3 }\n'
    )
    for args in (("status",), ("status", "--json"), ("recover",), ("recover", "--json"),
                 ("create-all",), ("create-all", "--json")):
        proc = run("-v", *args, "--config", str(config))
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        assert SECRET not in proc.stdout + proc.stderr, (args, proc.stdout, proc.stderr)
        if "--json" in args:
            doc = json.loads(proc.stdout)
            assert doc.get("ok", doc.get("resolved")) is False


def test_json_output_of_every_command(tmp_path: Path) -> None:
    config = sqlite_config(tmp_path)
    created = run("create-all", "--json", "--config", str(config))
    assert created.returncode == 0, created.stderr
    doc = json.loads(created.stdout)
    assert doc["ok"] is True
    assert [s["shard"] for s in doc["shards"]] == ["a", "b"]
    assert all(s["ok"] and s["can_prepare"] is False for s in doc["shards"])
    status = run("status", "--json", "--config", str(config))
    assert status.returncode == 0, status.stderr
    sdoc = json.loads(status.stdout)
    assert sdoc["ok"] is True and sdoc["in_doubt"] == []
    assert {s["shard"] for s in sdoc["shards"]} == {"a", "b"}
    recovered = run("recover", "--json", "--config", str(config))
    assert recovered.returncode == 0, recovered.stderr
    rdoc = json.loads(recovered.stdout)
    assert rdoc["resolved"] is True and rdoc["committed"] == [] and rdoc["errors"] == []


def test_create_all_finds_metadata_in_the_current_folder(tmp_path: Path) -> None:
    # A console script's sys.path[0] is its bin folder, not the working directory.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "shardsession_script.py"
    script.write_text("import sys\nfrom shardsession.cli import main\nsys.exit(main())\n")
    project = tmp_path / "project"
    project.mkdir()
    (project / "ss_here_models.py").write_text(
        "from sqlalchemy import Column, Integer, MetaData, Table\n"
        "metadata = MetaData()\n"
        "Table('here_things', metadata, Column('id', Integer, primary_key=True))\n"
    )
    config = sqlite_config(project)
    proc = subprocess.run(
        [sys.executable, str(script), "create-all", "--config", str(config),
         "--metadata", "ss_here_models:metadata"],
        capture_output=True, text=True, cwd=project, timeout=90,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "a: decision table ready, 1 application tables present" in proc.stdout


def test_watch_lines_carry_timestamps(tmp_path: Path) -> None:
    config = sqlite_config(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardsession", "recover", "--config", str(config), "--watch",
         "--interval", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while len(lines) < 2 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert len(lines) == 2, lines
    for line in lines:
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ committed=0 ", line), line


def test_unknown_shard_key_is_named(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[shards.a]\nurl = "sqlite:///{tmp_path / "a.db"}"\ncolour = 3\n')
    proc = run("status", "--config", str(config))
    assert proc.returncode == 2
    assert "shard 'a': unknown key(s) 'colour' (not create_engine() options)" in proc.stderr, \
        proc.stderr
    assert not (tmp_path / "a.db").exists()


@pytest.mark.parametrize(
    "url",
    [
        f"postgres://app@127.0.0.1:1/s1?password={SECRET}",  # a dialect name SQLAlchemy lacks
        f"mysql+mysqldb://app@127.0.0.1:1/s1?passwd={SECRET}",  # a driver not installed
        f"postgresql+psycopg2//app@127.0.0.1:1/s1?password={SECRET}",  # not a URL
    ],
)
def test_query_parameter_passwords_are_masked(tmp_path: Path, url: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[shards.a]\nurl = "{url}"\n')
    for args in (("status",), ("demo",)):
        proc = run(*args, "--config", str(config))
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert SECRET not in proc.stdout + proc.stderr, (args, proc.stdout, proc.stderr)
        assert "=***" in proc.stderr, proc.stderr


def test_repr_of_a_cluster_masks_query_passwords() -> None:
    from shardsession.config import Cluster

    cluster = Cluster({
        "a": f"postgresql+psycopg2://app@127.0.0.1:1/s1?password={SECRET}&sslmode=disable",
        "b": f"mysql+pymysql://app:{SECRET}@127.0.0.1:1/s1?PASSWD={SECRET}",
    })
    shown = repr(cluster)
    assert SECRET not in shown, shown
    assert "password=***&sslmode=disable" in shown and "PASSWD=***" in shown, shown


def test_short_passwords_are_masked_only_in_urls(tmp_path: Path) -> None:
    from shardsession.cli._common import Redactor

    redactor = Redactor()
    redactor.add(["p", SECRET])
    text = redactor(f"OperationalError at mysql://app:p@h/x?password=p and {SECRET}")
    assert text == "OperationalError at mysql://app:***@h/x?password=*** and ***", text


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("[cluster]\nrecovery_grace = nan\n", "recovery_grace must be a finite number"),
        ("[cluster]\nrecovery_grace = inf\n", "recovery_grace must be a finite number"),
        ("[cluster]\nrecovery_grace = true\n", "recovery_grace must be a finite number"),
        ('[cluster]\nrecovery_grace = "60"\n', "recovery_grace must be a finite number"),
        ('[shards.c]\nurl = "sqlite:///c.db"\npool_size = "abc"\n',
         "a create_engine() option has a value of the wrong type"),
    ],
)
def test_bad_config_numbers_are_refused_in_one_line(tmp_path: Path, setting: str,
                                                    message: str) -> None:
    config = sqlite_config(tmp_path)
    config.write_text(config.read_text() + setting)
    proc = run("status", "--config", str(config))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_json_config_errors_are_json(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    for args in (("status",), ("recover",), ("create-all",), ("migrate", "current")):
        proc = run(*args, "--config", str(missing), "--json", cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        doc = json.loads(proc.stdout)
        assert doc["ok"] is False and "missing.toml" in doc["error"], (args, doc)


def test_relative_sqlite_uri_filenames_resolve_against_the_config_folder(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    config = folder / "cluster.toml"
    config.write_text('[shards.e]\nurl = "sqlite:///file:e.db?uri=true"\n')
    proc = run("create-all", "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (folder / "e.db").exists() and not (tmp_path / "e.db").exists()


def test_demo_bad_inputs_are_clear_errors(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    one = sqlite_config(tmp_path / "one", ("a",))
    two_files = sqlite_config(tmp_path / "two", ("a", "b"))  # no atomic commit over them
    for args, code, message in (
        (("--dir", str(afile)), 2, "--dir"),
        (("--config", str(one)), 2, "at least two shards"),
        (("--config", str(two_files)), 1, "stopped:"),
    ):
        proc = run("demo", *args, cwd=tmp_path)
        assert proc.returncode == code, (args, proc.stdout, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
