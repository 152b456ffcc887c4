"""``genq demo``: the quick start. A real worker and the API on the embedded
default, a few prompts through HTTP, their statuses and results printed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.table import Table

from cli.common import console, err, wait_for_job

PROMPTS = ["Once upon a time", "The little dog wanted to", "One day, Tom and his mom"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cli", *args], stdout=out, stderr=subprocess.STDOUT, env=env
        )


def _tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _wait_ready(
    client: httpx.Client, procs: dict[str, tuple[subprocess.Popen[bytes], Path]]
) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for name, (proc, log) in procs.items():
            if proc.poll() is not None:
                err.print(f"[red]the {name} exited ({proc.returncode}):[/red]\n{_tail(log)}")
                raise typer.Exit(1)
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    err.print("[red]the API did not become ready in 120 s[/red]")
    raise typer.Exit(1)


def demo(
    max_new_tokens: Annotated[int, typer.Option(help="tokens per prompt")] = 40,
    prompts: Annotated[list[str] | None, typer.Argument(help="prompts (default: three)")] = None,
) -> None:
    """Start a worker and the API, generate for a few prompts, print the results."""
    env = dict(os.environ)
    # The demo's own API, on a free port of this machine: no key needed unless asked.
    env.setdefault("GENQ_REQUIRE_AUTH", "false")
    logs = Path(tempfile.mkdtemp(prefix="genq-demo-"))
    port = _free_port()
    env["GENQ_API_URL"] = f"http://127.0.0.1:{port}"
    console.print(f"model: [bold]{env.get('GENQ_MODEL', 'gpt2')}[/bold]   logs: {logs}")
    worker = _start(["worker", "--loglevel=WARNING"], logs / "worker.log", env)
    api = _start(["api", "--port", str(port)], logs / "api.log", env)
    procs = {"worker": (worker, logs / "worker.log"), "api": (api, logs / "api.log")}
    try:
        with httpx.Client(base_url=env["GENQ_API_URL"], timeout=30) as client:
            _wait_ready(client, procs)
            console.print("worker and API up; submitting prompts")
            ids = []
            for prompt in prompts or PROMPTS:
                body = {"prompt": prompt, "max_new_tokens": max_new_tokens}
                response = client.post("/v1/jobs", json=body)
                response.raise_for_status()
                ids.append(response.json()["id"])
            results = [_wait_alive(client, job_id, worker, logs / "worker.log") for job_id in ids]
        _print_results(results)
        if any(job["status"] != "succeeded" for job in results):
            raise typer.Exit(1)
    finally:
        for proc in (api, worker):
            proc.terminate()
        for proc in (api, worker):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait_alive(
    client: httpx.Client, job_id: str, worker: subprocess.Popen[bytes], log: Path
) -> dict[str, Any]:
    while True:
        job = wait_for_job(client, job_id, timeout=5)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        if worker.poll() is not None:
            err.print(f"[red]the worker exited ({worker.returncode}):[/red]\n{_tail(log)}")
            raise typer.Exit(1)


def _print_results(results: list[dict[str, Any]]) -> None:
    """A table on a terminal; elsewhere (a log, a pipe, CI) a block per job, so the
    text is not squeezed into what 80 columns leave beside the job id."""
    rows = []
    for job in results:
        text = job["prompt"] + (job.get("output") or "")
        if job.get("error"):
            text = f"{job['error']['code']}: {job['error']['message']}"
        usage = job.get("usage") or {}
        rows.append((job["id"], job["status"], str(usage.get("completion_tokens")), text))
    if not console.is_terminal:
        for job_id, status, tokens, text in rows:
            console.print(f"{job_id}  {status}  {tokens} tokens", highlight=False)
            console.print(f"  {text}", highlight=False, markup=False, soft_wrap=True)
        return
    table = Table(title="genq demo", show_lines=True)
    table.add_column("job", no_wrap=True)
    table.add_column("status")
    table.add_column("tokens", justify="right")
    table.add_column("prompt + output")
    for row in rows:
        table.add_row(*row)
    console.print(table)
