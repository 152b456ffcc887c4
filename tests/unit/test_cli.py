"""The ``genq`` commands as a newcomer meets them: errors in one line, ids never cut."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app as cli
from core import keys
from core.db import session_scope
from core.settings import get_settings


@pytest.fixture(autouse=True)
def _fresh_settings() -> Iterator[None]:
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize(
    "args",
    [["submit", "Once upon a time", "--wait"], ["submit", "hi"], ["status", "job_0192f"]],
    ids=["submit-wait", "submit", "status"],
)
def test_an_unreachable_api_is_one_line_naming_the_url_and_how_to_change_it(
    tmp_path: Path, args: list[str]
) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    env = {"GENQ_API_URL": url, "GENQ_DATA_DIR": str(tmp_path)}
    result = CliRunner().invoke(cli, args, env=env)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert url in lines[0] and "GENQ_API_URL" in lines[0] and "--api-url" in lines[0]
    assert "Traceback" not in result.output


def test_the_api_url_option_is_the_one_named(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    env = {"GENQ_API_URL": "http://127.0.0.1:1", "GENQ_DATA_DIR": str(tmp_path)}
    result = CliRunner().invoke(cli, ["status", "job_1", "--api-url", url], env=env)
    assert result.exit_code == 2
    assert url in result.stderr and "127.0.0.1:1 " not in result.stderr


def test_keys_list_never_cuts_an_id_in_an_80_column_terminal(
    tmp_path: Path, sqlite_url: str
) -> None:
    with session_scope(sqlite_url) as session:
        made = [
            keys.create_key(session, name=f"a-rather-long-key-name-{i}", owner="owner-" * 4)[0].id
            for i in range(3)
        ]
    env = {"GENQ_DATABASE_URL": sqlite_url, "GENQ_DATA_DIR": str(tmp_path), "COLUMNS": "80"}
    result = CliRunner().invoke(cli, ["keys", "list"], env=env, terminal_width=80)
    assert result.exit_code == 0, result.output
    listed = result.stdout.splitlines()
    assert listed[0].split()[:4] == ["id", "name", "owner", "prefix"]
    assert sorted(line.split()[0] for line in listed[1:]) == sorted(made), result.stdout


def test_the_demo_prints_each_result_whole_when_not_on_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from cli import demo

    text = " there was a little girl named Lily who loved to play outside in the sun"
    job = {
        "id": "job_01a2b3c4d5e6f708090a0b0c0d0e0f10",
        "status": "succeeded",
        "prompt": "Once upon a time",
        "output": text,
        "usage": {"completion_tokens": 40},
    }
    demo._print_results([job])
    out = capsys.readouterr().out
    assert job["id"] in out and "succeeded" in out and "40 tokens" in out
    assert "Once upon a time" + text in out


@pytest.mark.parametrize(
    ("variable", "value"),
    [("GENQ_ALLOCATOR", ""), ("GENQ_DTYPE", "bogus"), ("GENQ_MAX_BATCH_SIZE", "0")],
)
def test_a_bad_setting_is_one_line_naming_the_variable(variable: str, value: str) -> None:
    result = CliRunner().invoke(cli, ["migrate"], env={variable: value})
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {variable}: "), result.output
    assert "Traceback" not in result.output
