"""The pyqueue command without a server: help, arguments, import paths, tables,
and the one-line reason a failed connection gives."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pyqueue import _embedded, cli
from pyqueue._connection import failure_reason


@pytest.mark.parametrize("command", ["migrate", "worker", "publish", "stats", "demo"])
def test_every_command_documents_dsn_schema_and_the_embedded_dir(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])

    text = " ".join(capsys.readouterr().out.split())
    assert exited.value.code == 0
    for option in ("--dsn", "--schema", "--verbose", "--quiet", "$PYQUEUE_DSN"):
        assert option in text
    assert str(_embedded.data_dir()) in text


def test_publish_rejects_malformed_json_with_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = cli.main(["publish", "c", "{nope", "--dsn", "host=x"])

    assert status == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("pyqueue: error: ARGS_JSON is not valid JSON: '{nope'")


def test_concurrency_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["worker", "m:q", "--concurrency", "0"])

    assert exited.value.code == 2
    assert "expected a positive integer, got '0'" in capsys.readouterr().err


def test_load_queue_accepts_a_queue_or_a_factory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "unit_tasks.py").write_text(
        "from pyqueue import Queue\n"
        "queue = Queue('host=x')\n"
        "def factory():\n    return queue\n"
        "def wrong():\n    return 3\n"
        "def broken():\n    raise ZeroDivisionError\n"
        "def handler(n):\n    return n + 1\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))

    assert cli.load_queue("unit_tasks:queue") is cli.load_queue("unit_tasks:factory")
    with pytest.raises(cli.UsageError, match="returned a int, not a Queue"):
        cli.load_queue("unit_tasks:wrong")
    with pytest.raises(cli.UsageError, match="needs arguments \\(a handler\\?\\)"):
        cli.load_queue("unit_tasks:handler")
    with pytest.raises(cli.Failure, match="calling 'unit_tasks:broken' failed"):
        cli.load_queue("unit_tasks:broken")
    with pytest.raises(cli.UsageError, match="has no attribute 'missing'"):
        cli.load_queue("unit_tasks:missing")
    with pytest.raises(cli.UsageError, match="no module named 'nowhere'"):
        cli.load_queue("nowhere.deeper:queue")
    sys.modules.pop("unit_tasks", None)


def test_load_queue_reports_a_module_that_fails_to_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "unit_broken.py").write_text("import not_installed_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    with pytest.raises(cli.Failure, match="importing 'unit_broken' failed"):
        cli.load_queue("unit_broken:queue")


def test_format_table_lays_out_rows_as_psql_does() -> None:
    text = cli.format_table(
        ["id", "queue", "result"],
        [["1", "increment-queue", "18"], ["12", "q", ""]],
        right={0},
    )

    assert text == (
        " id |      queue      | result \n"
        "----+-----------------+--------\n"
        "  1 | increment-queue | 18\n"
        " 12 | q               | \n"
        "(2 rows)\n"
    )


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.4, "0s"),
        (59, "59s"),
        (125, "2m05s"),
        (3 * 3600 + 420, "3h07m"),
        (2 * 86400 + 4 * 3600, "2d04h"),
    ],
)
def test_durations_are_short(seconds: float, text: str) -> None:
    assert cli._duration(seconds) == text


@pytest.mark.parametrize(
    ("libpq", "reason"),
    [
        (
            'connection to server at "127.0.0.1", port 5 failed: Connection refused\n'
            "\tIs the server running on that host?",
            "connection refused",
        ),
        (
            'connection to server at "127.0.0.1", port 5432 failed: FATAL:  '
            'database "nodb" does not exist',
            'database "nodb" does not exist',
        ),
        ("SSL SYSCALL error: EOF detected", "SSL SYSCALL error: EOF detected"),
    ],
)
def test_connection_failure_reason_is_the_gist_of_what_libpq_said(
    libpq: str, reason: str
) -> None:
    assert failure_reason(Exception(libpq)) == reason
