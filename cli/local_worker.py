"""The worker `genq run` starts for itself when no worker serves its model.

It runs in its own session, so a Ctrl-C in the terminal reaches `genq run` alone,
which then stops the worker once, the way a worker is meant to stop: SIGTERM, a
grace of zero (``GENQ_SHUTDOWN_GRACE_S=0``), so the jobs it is running are handed
back to the queue at once, their attempts not counted, and the messages it holds
go back unstarted. A resume then finds them queued, fresh, and runs them batched
at the usual rate instead of waiting for leases and retrying them one by one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys

import typer
from rich.console import Console

from core import batches, workers
from core.db import get_sessionmaker
from core.settings import Settings

STOP_TIMEOUT_S = 20.0
"""How long a stopping worker may take to hand its jobs back before it is killed."""


class LocalWorker:
    """A ``genq worker`` child process serving ``model``, logging to ``log``."""

    def __init__(self, settings: Settings, model: str) -> None:
        self.log = settings.data_dir / f"run-worker-{os.getpid()}.log"
        # Named by this process, so its jobs' ``worker`` column says where they ran.
        self.name = f"genq-run{os.getpid()}@{socket.gethostname()}"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "GENQ_SHUTDOWN_GRACE_S": "0"}
        serve = []
        if model != settings.model_id:  # `genq run --model`: another model than GENQ_MODEL
            serve = [f"--model={model}"]
            env.pop("GENQ_MODEL_NAME", None)  # the name was GENQ_MODEL's
        with self.log.open("wb") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli", "worker", "--loglevel=WARNING",
                 f"--hostname={self.name}", *serve],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a terminal's Ctrl-C is not sent to it
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exited(self) -> int | None:
        """Its exit status once it has exited, else None."""
        return self.proc.poll()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        """SIGTERM, then wait; True if it stopped by itself (its jobs handed back),
        False if it had to be killed (its running jobs come back when their leases
        expire, counted as an attempt)."""
        if self.proc.poll() is not None:
            return True
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            self.kill()
            return False

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()

    def tail(self, lines: int = 20) -> str:
        """The end of its log."""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class RunWorkers:
    """Who runs a `genq run` batch: a live worker serving its model when there is
    one (a second copy of the model would only compete with it), else this run's
    own :class:`LocalWorker`, started again if the live one goes away.

    ``own``: True starts one of the run's own whatever is running (``--worker``),
    False never does (``--no-worker``), None decides as above on the embedded
    default and never where GENQ_BROKER_URL is set.
    """

    def __init__(
        self, url: str, settings: Settings, model: str, own: bool | None, err: Console
    ) -> None:
        self.url = url
        self.settings = settings
        self.model = model
        self.err = err
        self.may_start = own if own is not None else settings.broker_url is None
        self.forced = own is True
        self.local: LocalWorker | None = None

    def start(self) -> None:
        """Use a live worker for the model, or start the run's own."""
        if not self.may_start:
            return
        names = [] if self.forced else self._serving()
        if names:
            self.err.print(
                f"using the running worker {', '.join(names)} serving {self.model} "
                "(--worker starts one of this run's own)",
                highlight=False,
            )
        else:
            self._start_local()

    def check(self) -> None:
        """Between progress reads: fail if the run's worker died; start one if the
        live worker it relied on went away."""
        if self.local is not None:
            if (code := self.local.exited()) is not None:
                self.err.print(f"[red]the local worker exited ({code}):[/red]\n{self.local.tail()}")
                raise typer.Exit(1)
        elif self.may_start and not self._serving():
            self.err.print(f"no live worker serves {self.model} any more", highlight=False)
            self._start_local()

    def stop(self) -> None:
        if self.local is not None:
            self.local.stop()

    def interrupted(self, batch_id: str) -> None:
        """Ctrl-C: stop this run's worker at once, its running jobs handed back to
        the queue uncounted; a second Ctrl-C kills it."""
        err = self.err
        if self.local is not None:
            err.print(
                "[yellow]interrupted[/yellow]: stopping the local worker; "
                "the requests it is running go back to the queue"
            )
            try:
                stopped = self.local.stop()
            except KeyboardInterrupt:
                self.local.kill()
                stopped = False
            if not stopped:
                err.print(
                    "the worker was killed: its running requests go back to the queue "
                    "when their leases expire (GENQ_LEASE_S)"
                )
        else:
            err.print("[yellow]interrupted[/yellow]: the workers serving the batch go on with it")
        with contextlib.suppress(Exception), get_sessionmaker(self.url)() as session:
            tally = batches.counts(session, batch_id)
            err.print(f"{tally.completed + tally.failed} of {tally.total} requests done")
        err.print("run the same command again to resume")

    def _serving(self) -> list[str]:
        with get_sessionmaker(self.url)() as session:
            within_s = self.settings.worker_heartbeat_s * 3
            names = workers.serving(session, self.model, within_s=within_s)
        # A worker killed outright stays registered until its heartbeat is stale;
        # one of this machine (named host:pid) is known dead at once.
        return [name for name in names if not _dead_here(name)]

    def _start_local(self) -> None:
        self.local = LocalWorker(self.settings, self.model)
        self.err.print(f"started a local worker (pid {self.local.pid}, log {self.local.log})")


def _dead_here(name: str) -> bool:
    """Whether a worker registered as ``host:pid`` ran on this machine and is gone."""
    host, _, pid = name.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _die_with_parent() -> None:
    """Linux: the worker gets SIGTERM if `genq run` dies, even killed."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)
