"""The ``genq`` command: run the API or a worker, migrate, submit and query jobs."""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from cli import allocator, demo, keys, run
from cli.client import api_client
from cli.common import FINAL, console, err, fail_http, migrate_embedded, wait_for_job
from core.settings import get_settings

app = typer.Typer(
    help="genq: queued text generation with Celery workers and SQL as the source of truth.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _settings_first() -> None:
    # Read the GENQ_* settings before any command: a bad value is one line naming the
    # variable, not a traceback. (No docstring: it would become the app's help.)
    try:
        get_settings()
    except ValidationError as exc:
        for error in exc.errors():
            field = str(error["loc"][0]).upper() if error["loc"] else "*"
            err.print(f"[red]error:[/red] GENQ_{field}: {error['msg']}")
        raise typer.Exit(2) from exc


@app.command()
def migrate(revision: Annotated[str, typer.Option(help="target revision")] = "head") -> None:
    """Apply the database migrations (GENQ_DATABASE_URL)."""
    import migrations

    url = get_settings().resolved_database_url
    migrations.upgrade(url, revision)
    console.print(f"database at {_redact(url)} is at revision {revision}")


@app.command()
def api(
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1,
) -> None:
    """Serve the HTTP API (docs at /docs)."""
    import uvicorn

    migrate_embedded()
    uvicorn.run(
        "api.app:create_app", factory=True, host=host, port=port, workers=workers, log_level="info"
    )


@app.command()
def worker(
    model: Annotated[
        str | None, typer.Option(help="the model to serve (default: GENQ_MODEL)")
    ] = None,
    concurrency: Annotated[
        int, typer.Option(help="jobs in flight per process (default: max batch size + 8)")
    ] = 0,
    loglevel: Annotated[str, typer.Option(help="Celery log level")] = "INFO",
    hostname: Annotated[str | None, typer.Option(help="Celery node name")] = None,
    events: Annotated[
        bool | None,
        typer.Option(
            "--events/--no-events", help="send Celery task events for Flower (GENQ_WORKER_EVENTS)"
        ),
    ] = None,
) -> None:
    """Run a Celery worker that holds one model and batches its jobs.

    It consumes that model's queues, high priority first, with Celery's threads
    pool: one process, one copy of the weights, and as many task threads as jobs
    that may share a forward pass.
    """
    try:  # first of all: this may run the command again, under jemalloc
        allocator.run_again_with_allocator(get_settings().allocator)
    except allocator.AllocatorError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    err.print(f"memory allocator: {allocator.allocator_name()}")
    if model:
        os.environ["GENQ_MODEL"] = model
        get_settings.cache_clear()
    from core.queue import queues_for, urgent_prefetch
    from worker import lifecycle
    from worker.celery_app import app as celery_app
    from worker.celery_app import quiet_root_warning

    migrate_embedded()
    settings = get_settings()
    try:
        lifecycle.get_runtime()  # load the model before taking any job
    except lifecycle.EngineLoadError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    # Threads for the jobs in flight, and for the messages of the prefetch places kept
    # for the high and express queues (core.broker).
    threads = (concurrency or settings.resolved_worker_concurrency) + urgent_prefetch(settings)
    argv = [
        "worker",
        "--pool=threads",
        f"--concurrency={threads}",
        f"--queues={','.join(queues_for(settings.queue, settings.model_id))}",
        f"--loglevel={loglevel}",
        # Task events (for Flower) cost the consumer about a millisecond per job;
        # --no-events (GENQ_WORKER_EVENTS=false) saves it for bulk throughput.
        *(["--task-events"] if (events if events is not None else settings.worker_events) else []),
        "--without-gossip",
        "--without-mingle",
        # Unique per process, so several workers on one machine are told apart.
        f"--hostname={hostname or f'genq{os.getpid()}@%h'}",
    ]
    quiet_root_warning(celery_app.conf.accept_content)
    celery_app.worker_main(argv)


@app.command()
def submit(
    prompt: Annotated[str, typer.Argument(help="the prompt to continue")],
    max_new_tokens: Annotated[int | None, typer.Option(help="tokens to generate")] = None,
    sample: Annotated[bool, typer.Option("--sample", help="sample instead of greedy")] = False,
    temperature: Annotated[float | None, typer.Option(help="sampling temperature")] = None,
    num_beams: Annotated[int | None, typer.Option(help="beam search width")] = None,
    seed: Annotated[int | None, typer.Option(help="seed for sampling")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="wait for the result")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait with --wait")] = 300,
    as_json: Annotated[bool, typer.Option("--json", help="print the job as JSON")] = False,
    api_url: Annotated[str | None, typer.Option(help="API base URL (GENQ_API_URL)")] = None,
) -> None:
    """Submit a prompt through the API; prints the job id (or, with --wait, the result).

    With --wait the exit status says how it ended: 0 succeeded, 1 failed or
    cancelled, 3 still not finished when the timeout ran out. 2: the API could
    not be reached (GENQ_API_URL, or --api-url).
    """
    body: dict[str, Any] = {"prompt": prompt}
    optional = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "num_beams": num_beams,
        "seed": seed,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if sample:
        body["do_sample"] = True
    with api_client(api_url) as client:
        response = client.post("/v1/jobs", json=body)
        fail_http(response)
        job = response.json()
        if wait:
            job = wait_for_job(client, job["id"], timeout)
    _print_job(job, as_json=as_json, brief=not wait)
    if wait and job["status"] not in FINAL:
        err.print(f"[yellow]still {job['status']} after {timeout:g} s[/yellow]")
        raise typer.Exit(3)
    if wait and job["status"] != "succeeded":
        raise typer.Exit(1)


@app.command()
def status(
    job_id: Annotated[str, typer.Argument(help="the job id")],
    as_json: Annotated[bool, typer.Option("--json", help="print the job as JSON")] = False,
    api_url: Annotated[str | None, typer.Option(help="API base URL (GENQ_API_URL)")] = None,
) -> None:
    """Show a job's status and output."""
    with api_client(api_url) as client:
        response = client.get(f"/v1/jobs/{job_id}")
        fail_http(response)
    _print_job(response.json(), as_json=as_json, brief=False)


def _print_job(job: dict[str, Any], *, as_json: bool, brief: bool) -> None:
    if as_json:
        console.print_json(json.dumps(job))
        return
    if brief:
        console.print(job["id"])
        return
    console.print(f"[bold]{job['id']}[/bold]  {job['status']}")
    if job.get("output") is not None:
        console.print(f"{job['prompt']}[green]{job['output']}[/green]", highlight=False)
    if job.get("error"):
        console.print(f"[red]{job['error']['code']}[/red]: {job['error']['message']}")


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


app.command(name="demo")(demo.demo)
app.add_typer(keys.app, name="keys")
app.command(name="run")(run.run)
