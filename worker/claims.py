"""Claims of messages that arrive together, made in one statement (a group commit).

Each Celery message runs in its own task thread and claims its jobs before the engine
sees them. When many arrive at once (a client's burst, a feeder's window) one claim
transaction per message competes for the CPU with the engine's forwards, and a job
whose message came last waits for all the claims before its own. Here the first thread
to claim leads: it claims for every message waiting at that moment in one statement;
the messages that arrive meanwhile wait and the next of them leads the next round.
Each thread gets exactly its own jobs' claims and suspects back.

A statement that fails with several messages in it does not say whose ids made it fail
(an id PostgreSQL cannot take, say): each of those messages then claims its own jobs
alone, so a message fails only where its own statement would have.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from core.jobstate import Claim

ClaimFresh = Callable[[list[str]], tuple[list[Claim], list[str]]]
"""Claims the fresh jobs among ids in one statement: their claims and the suspects."""


@dataclass
class _Entry:
    ids: list[str]
    claims: list[Claim] = field(default_factory=list)
    suspects: list[str] = field(default_factory=list)
    error: BaseException | None = None
    alone: bool = False  # its round failed with other messages in it: claim alone
    done: bool = False


class GroupClaimer:
    """``claim(ids)`` as ``claim_fresh`` would answer it alone, with the claims of the
    threads calling at the same time made together."""

    def __init__(self, claim_fresh: ClaimFresh) -> None:
        self._claim_fresh = claim_fresh
        self._cond = threading.Condition()
        self._waiting: list[_Entry] = []
        self._busy = False
        self.rounds = 0  # statements made (tests, metrics)

    def claim(self, ids: Sequence[str]) -> tuple[list[Claim], list[str]]:
        entry = _Entry(list(ids))
        with self._cond:
            self._waiting.append(entry)
            while self._busy and not entry.done:
                self._cond.wait()
            if not entry.done:  # this thread leads the next round
                self._busy = True
                group, self._waiting = self._waiting, []
        if not entry.done:
            self._lead(group)
        if entry.alone:  # nothing was claimed for it (the failed statement rolled back)
            return self._claim_fresh(entry.ids)
        if entry.error is not None:
            raise entry.error
        return entry.claims, entry.suspects

    def _lead(self, group: list[_Entry]) -> None:
        try:
            ids = list(dict.fromkeys(i for e in group for i in e.ids))
            try:
                claims, suspects = self._claim_fresh(ids)
            except Exception as exc:  # the statement rolled back: nothing was claimed
                if len(group) == 1:
                    group[0].error = exc  # its own, as alone
                else:
                    # Whose ids made it fail is not known: each message claims alone
                    # (one request may fail only itself).
                    for e in group:
                        e.alone = True
                return
            # A job in two messages (a duplicate) runs once: the first one gets it.
            by_id = {c.job_id: c for c in claims}
            suspect = set(suspects)
            for e in group:
                e.claims = [by_id.pop(i) for i in e.ids if i in by_id]
                e.suspects = [i for i in e.ids if i in suspect]
        except BaseException:  # the leading thread's own (an interrupt): the others go on
            for e in group:
                e.alone = True
            raise
        finally:
            with self._cond:
                self.rounds += 1
                for e in group:
                    e.done = True
                self._busy = False
                self._cond.notify_all()
