"""``genq run INPUT -o OUTPUT``: bulk offline generation from the command line.

It talks to the database and the queue directly (no HTTP), so it works on the
embedded default and on Redis/PostgreSQL alike. The input becomes a batch (one
job per line, validated and inserted in one transaction) keyed by a hash of the
input's absolute path and content: running the same command again after an
interruption finds that batch and resumes it. Completed lines are never
generated again; queued ones are re-sent (a duplicate message is harmless);
running ones whose worker died are handed back by the sweeper once their lease
expires. The output is written, streamed from the job rows in input order, once
every line is final. A live worker serving the model runs the batch; without one
the run starts its own (cli/local_worker.py), and Ctrl-C hands that worker's
running jobs back to the queue at once, uncounted.

Inputs, one request per line (blank lines skipped):

- OpenAI's batch format: ``{"custom_id", "method", "url", "body": {...}}``;
- genq's job format: ``{"prompt": ..., transformers' parameters as for POST
  /v1/jobs, optional "model" and "custom_id"}``;
- plain text: each line is a prompt (``--format text``, or a file that does not
  start with ``{``). A line without a custom_id gets ``line-N``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cli.common import migrate_embedded
from cli.local_worker import RunWorkers
from core import batches, feed
from core.batches.run_input import InputFormat, find_run, parse_input, run_key
from core.db import get_sessionmaker
from core.models import LOCAL_OWNER, Batch
from core.queue import get_queue
from core.settings import Settings, get_settings, model_id
from core.submit import served_models

err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


def run(
    input_path: Annotated[
        Path, typer.Argument(metavar="INPUT", exists=True, dir_okay=False, help="the requests")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="where to write the results")],
    fmt: Annotated[
        InputFormat, typer.Option("--format", help="auto: JSONL if it starts with '{', else text")
    ] = InputFormat.AUTO,
    model: Annotated[str | None, typer.Option(help="for lines that name none")] = None,
    max_tokens: Annotated[
        int | None, typer.Option(min=1, help="tokens per line where the line gives no length")
    ] = None,
    worker: Annotated[
        bool | None,
        typer.Option(
            "--worker/--no-worker",
            help="start a local worker for the run (default: on the embedded default, "
            "unless a live worker serves the model; never when GENQ_BROKER_URL is set)",
        ),
    ] = None,
    owner: Annotated[str, typer.Option(help="the owner of the batch and its jobs")] = LOCAL_OWNER,
    poll: Annotated[float, typer.Option(min=0.05, help="seconds between progress reads")] = 0.5,
) -> None:
    """Generate for every line of INPUT and write one result line per request to OUTPUT.

    Re-running the same command after an interruption resumes: lines already
    completed are not generated again.
    """
    settings = get_settings()
    migrate_embedded()
    url = settings.resolved_database_url
    key = run_key(input_path)
    default_model = model_id(model) if model else settings.model_id
    with get_sessionmaker(url)() as session:
        models = served_models(session, settings)
        batch = find_run(session, key, owner)
        resumed = batch is not None
        if batch is None:
            started = time.perf_counter()
            parsed = parse_input(
                input_path,
                fmt,
                models=models,
                default_model=default_model,
                max_tokens=max_tokens,
                default_max_tokens=settings.default_max_new_tokens,
            )
            batch = batches.create_batch(
                session,
                owner=owner,
                input_file_id=None,
                parsed=parsed,
                completion_window=None,
                metadata={"genq_run": str(input_path.resolve())},
                models=models,
                max_lines=settings.max_batch_lines,
                run_key=key,
            )
            if batch.status == "failed":
                _print_errors(batch)
                raise typer.Exit(1)
            elapsed = time.perf_counter() - started
            err.print(
                f"batch {batch.id}: {batch.total} requests ingested in {elapsed:.1f} s "
                f"({batch.total / max(elapsed, 1e-9):,.0f} lines/s)"
            )
        batch_id = batch.id
        tally = batches.counts(session, batch_id)
        if resumed:
            err.print(
                f"resuming batch {batch_id}: {tally.completed + tally.failed} of {tally.total} "
                "already done; they are not generated again"
            )
    runners = RunWorkers(url, settings, default_model, worker, err)
    try:
        if tally.active:
            runners.start()
            # Sent from a thread (a broker takes a few hundred messages a second), so
            # the worker starts on the first ones while the progress bar runs.
            sender = threading.Thread(
                target=_send, args=(url, settings, batch_id, resumed), daemon=True
            )
            sender.start()
            _watch(url, batch_id, poll, runners)
        _write_output(url, batch_id, output)
    except KeyboardInterrupt:
        runners.interrupted(batch_id)
        raise typer.Exit(130) from None
    finally:
        runners.stop()


def _send(url: str, settings: Settings, batch_id: str, resumed: bool) -> None:
    """Send the first window of the batch's jobs (the workers' feeder sends the rest,
    core.feed); on resuming, first hand its queued jobs back to the feeder (their
    messages may be gone; a duplicate is harmless). Retried for a while (a database
    or broker blip)."""
    deadline = time.monotonic() + settings.db_retry_s
    delay = 0.5
    sent = 0
    while True:
        try:
            factory = get_sessionmaker(url)
            if resumed and not sent:
                with factory() as session:
                    sent = feed.unsend_batch(session, batch_id)
                    session.commit()
            feed.feed_once(factory, get_queue(settings), settings)
            break
        except Exception as exc:
            if time.monotonic() > deadline:
                err.print(f"[yellow]could not send every request to the broker:[/yellow] {exc}")
                return
            time.sleep(delay)
            delay = min(delay * 2, 10)
    if resumed and sent:
        err.print(f"re-sent {sent} queued requests")


def _watch(url: str, batch_id: str, poll: float, runners: RunWorkers) -> None:
    """Show progress until every request of the batch is final."""
    with get_sessionmaker(url)() as session:
        first = batches.counts(session, batch_id)
    done0, tokens0, t0 = first.completed + first.failed, first.completion_tokens, time.monotonic()
    live = err.is_terminal
    progress = Progress(
        TextColumn("[bold]generating"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("failed {task.fields[failed]}"),
        TextColumn("{task.fields[rate]:,.0f} tokens/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        disable=not live,
    )
    last_print = 0.0
    with progress:
        task = progress.add_task(
            "run", total=first.total, completed=done0, failed=first.failed, rate=0.0
        )
        while True:
            with get_sessionmaker(url)() as session:
                tally = batches.counts(session, batch_id)
            done = tally.completed + tally.failed
            elapsed = max(time.monotonic() - t0, 1e-9)
            rate = (tally.completion_tokens - tokens0) / elapsed
            progress.update(task, completed=done, failed=tally.failed, rate=rate)
            if not live and (time.monotonic() - last_print >= 2 or not tally.active):
                per_s = (done - done0) / elapsed
                eta = f"{(tally.total - done) / per_s:.0f} s" if per_s > 0 else "?"
                err.print(
                    f"done {done}/{tally.total}  failed {tally.failed}  "
                    f"{rate:,.0f} tokens/s  elapsed {_clock(elapsed)}  ETA {eta}",
                    highlight=False,
                )
                last_print = time.monotonic()
            if not tally.active:
                return
            runners.check()
            time.sleep(poll)


def _clock(seconds: float) -> str:
    """``m:ss`` (``h:mm:ss`` past an hour), as the progress bar shows elapsed time."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _write_output(url: str, batch_id: str, output: Path) -> None:
    """Finalize the batch and write every result line, streamed, in input order."""
    with get_sessionmaker(url)() as session:
        batch = batches.get_batch(session, batch_id, owner=None)
        if batches.finalize(session, batch):
            session.commit()
        tmp = output.with_name(output.name + ".part")
        written = {"output": 0, "error": 0}
        with tmp.open("wb") as f:
            for kind, line in batches.result_lines(session, batch, kind=None):
                f.write(line)
                written[kind] += 1
        tmp.replace(output)
    out.print(
        f"wrote {written['output'] + written['error']} lines to {output}: "
        f"{written['output']} succeeded, {written['error']} failed"
    )


def _print_errors(batch: Batch) -> None:
    err.print(
        f"[red]the input is invalid; nothing was queued[/red] ({len(batch.errors or [])} errors)"
    )
    for error in batch.errors or []:
        where = f"line {error['line']}" if error.get("line") else "file"
        param = f" ({error['param']})" if error.get("param") else ""
        err.print(f"  {where}: {error['code']}{param}: {error['message']}", highlight=False)
