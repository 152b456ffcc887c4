"""Claims of messages that arrive together, made in one statement (a group commit).

Each Celery message runs in its own task thread and claims its jobs before the engine
sees them. When many arrive at once (a client's burst, a feeder's window) one claim
transaction per message competes for the CPU with the engine's forwards, and a job
whose message came last waits for all the claims before its own. Here the claims of
the messages waiting together are made in one statement (:mod:`worker.groupcommit`),
and each thread gets exactly its own jobs' claims and suspects back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from core.jobstate import Claim
from worker.groupcommit import GroupCommit

ClaimFresh = Callable[[list[str]], tuple[list[Claim], list[str]]]
"""Claims the fresh jobs among ids in one statement: their claims and the suspects."""


class _Suspect:
    """The answer for a suspect's id."""


_SUSPECT = _Suspect()
Answer = Claim | _Suspect | None
"""Per id: its claim, :data:`_SUSPECT`, or None (not queued: skipped)."""


class GroupClaimer:
    """``claim(ids)`` as ``claim_fresh`` would answer it alone, with the claims of the
    threads calling at the same time made together."""

    def __init__(self, claim_fresh: ClaimFresh) -> None:
        self._claim_fresh = claim_fresh
        self.group: GroupCommit[str, Answer] = GroupCommit(self._answers)

    def claim(self, ids: Sequence[str]) -> tuple[list[Claim], list[str]]:
        answers = self.group(ids)
        claims = [a for a in answers if a is not None and not isinstance(a, _Suspect)]
        suspects = [i for i, a in zip(ids, answers, strict=True) if a is _SUSPECT]
        return claims, suspects

    def _answers(self, ids: list[str]) -> list[Answer]:
        claims, suspects = self._claim_fresh(list(dict.fromkeys(ids)))
        # A job in two messages (a duplicate) runs once: the first one gets it.
        by_id = {c.job_id: c for c in claims}
        suspect = set(suspects)
        return [by_id.pop(i) if i in by_id else _SUSPECT if i in suspect else None for i in ids]
