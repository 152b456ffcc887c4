"""Which jobs are short: they skip long jobs' backlog, in the broker and in the engine.

A short job (a web app's: a few new tokens, a few rows, a small prompt) that waits
behind long ones waits many times its own cost. So at both places where jobs queue it
goes first:

- in the broker, a short job of ``normal`` priority is sent to its model's ``express``
  queue, which workers read right after ``high`` (:mod:`core.queue`): it does not wait
  for the messages of long jobs sent before it;
- in the engine, a short request runs in the express lane
  (:mod:`worker.engine.lanes`): it does not wait for the running batch's requests.

Bulk work (``low`` priority: a batch's lines, however short) takes neither. The express
queue is read before ``normal``, so it is paced per owner (:data:`PACE`): past a burst
of ``EXPRESS_BURST`` and a rate of ``EXPRESS_RATE_PER_S`` short jobs a second (per API
process), an owner's short jobs go to ``normal`` in order with everyone's, and a flood of
them cannot hold back the long ``normal`` jobs sent before it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.quotas import RateLimiter

# Rows (beams, or sequences to return) of a short request at most.
EXPRESS_ROWS = 4
# Cache tokens (prompt plus new tokens, over its rows) of a short request at most: a
# long prompt is a prefill that would stall the running batch.
EXPRESS_MAX_TOKENS = 512
# Short jobs an owner may send to the express queue at once, and per second after that.
EXPRESS_BURST = 16
EXPRESS_RATE_PER_S = 4.0
PACE = RateLimiter(EXPRESS_RATE_PER_S, EXPRESS_BURST)
"""The owners' express budgets in this process (tests replace it with a fresh one)."""


def sends_express(row: Mapping[str, Any], max_new_tokens: int) -> bool:
    """Whether a new job's row goes to the express queue: ``normal`` priority (``high``
    has its own queue, read first) and short by the engine's measure, with the prompt's
    characters standing in for its tokens (the API does not tokenize; a job sent there
    that the engine finds longer only skipped the broker's backlog).

    ``row`` is a job row as :func:`core.submit.job_row` makes it (parameters with
    ``max_new_tokens`` filled in unless ``max_length`` was given); ``max_new_tokens`` is
    ``GENQ_EXPRESS_MAX_NEW_TOKENS`` (0: no express queue)."""
    params = row["params"]
    new = params.get("max_new_tokens")
    if row["priority"] != "normal" or not max_new_tokens or new is None or new > max_new_tokens:
        return False
    new = int(new)
    rows = int(max(params.get("num_beams", 1), params.get("num_return_sequences", 1)))
    chars = len(row["prompt"] or "") + sum(
        len(message.get("content") or "") for message in row.get("messages") or []
    )
    return rows <= EXPRESS_ROWS and rows * (chars + new) <= EXPRESS_MAX_TOKENS


def paced(owner: str) -> bool:
    """Spend one of ``owner``'s express budget; False when it is spent."""
    return PACE.take(owner) is None
