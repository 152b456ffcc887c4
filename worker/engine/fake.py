"""A deterministic engine without torch, for fast tests of the queue plumbing.

The output of a request is its prompt's words reversed, cycled to
``max_new_tokens`` words ("tokens" are words here). It honours abort, progress,
stop strings, ``num_return_sequences`` and a prompt-length limit, and can sleep
per token so tests can observe a request mid-generation.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from worker.engine.base import (
    FinishReason,
    GenerationError,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    Progress,
)


def fake_logprobs(words: list[str], top: int) -> list[dict[str, Any]]:
    """Made-up logprobs of the words (a word of k letters scores -k/10), in OpenAI's
    chat shape, so the plumbing from engine to API can be tested without a model."""

    def entry(token: str) -> dict[str, Any]:
        return {"token": token, "logprob": -len(token) / 10, "bytes": list(token.encode())}

    alternatives = sorted({" " + w for w in words}, key=len)[:top]
    return [entry(" " + w) | {"top_logprobs": [entry(a) for a in alternatives]} for w in words]


def fake_chat_prompt(messages: list[dict[str, str]]) -> str:
    """The fake model's chat template: one ``role: content`` line each, then the
    assistant's turn."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def fake_words(prompt: str, params_max_new: int) -> list[str]:
    """The words the fake model generates for ``prompt``."""
    words = list(reversed(prompt.split())) or ["."]
    return [words[i % len(words)] for i in range(params_max_new)]


class FakeEngine:
    """An :class:`~worker.engine.base.Engine` whose output is a pure function of the request.

    ``max_prompt_words``: longer prompts fail with ``prompt_too_long``.
    ``token_delay_s``: sleep per generated word (0 for instant results).
    ``default_max_new_tokens``: used when a request gives no length.
    """

    def __init__(
        self,
        *,
        max_prompt_words: int = 1024,
        token_delay_s: float = 0.0,
        default_max_new_tokens: int = 50,
        max_workers: int = 64,
        crash_on: str | None = None,
        name: str = "fake",
    ) -> None:
        self.info = ModelInfo(
            name=name,
            revision="fake",
            torch_version="none",
            transformers_version="none",
            device="cpu",
            dtype="none",
            products="none",
            context_length=max_prompt_words,
            chat_template=True,
        )
        self.max_prompt_words = max_prompt_words
        self.token_delay_s = token_delay_s
        self.default_max_new_tokens = default_max_new_tokens
        self.crash_on = crash_on
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="genq-fake")
        self._lock = threading.Lock()
        self._aborted: set[str] = set()
        self._progress: dict[str, Progress] = {}
        # Requests not started yet (all pool threads busy): an abort resolves them
        # at once, as the batching engine does with its waiting requests.
        self._waiting: dict[str, tuple[GenerationRequest, Future[GenerationResult]]] = {}
        self._closed = False

    def submit(self, request: GenerationRequest) -> Future[GenerationResult]:
        """Run the request on a pool thread; the future resolves to its result."""
        if self._closed:
            future: Future[GenerationResult] = Future()
            future.set_exception(GenerationError("engine_stopped", "the engine is closed"))
            return future
        outer: Future[GenerationResult] = Future()
        with self._lock:
            self._waiting[request.id] = (request, outer)
        self._pool.submit(self._run, request, outer)
        return outer

    def _run(self, request: GenerationRequest, outer: Future[GenerationResult]) -> None:
        with self._lock:
            if self._waiting.pop(request.id, None) is None:  # aborted while it waited
                self._aborted.discard(request.id)
                return
        try:
            outer.set_result(self._generate(request))
        except BaseException as exc:
            outer.set_exception(exc)

    def abort(self, request_id: str) -> None:
        """Make the request stop at its next word; a waiting one resolves at once."""
        with self._lock:
            self._aborted.add(request_id)
            request, outer = self._waiting.pop(request_id, (None, None))
        if request is not None and outer is not None:
            n = request.params.num_return_sequences
            prompt_words = len(request.prompt.split())
            outer.set_result(GenerationResult([""] * n, ["length"] * n, prompt_words, 0, True))

    def progress(self, request_id: str) -> Progress | None:
        """Words so far and the text of sequence 0, or None when unknown."""
        with self._lock:
            return self._progress.get(request_id)

    def check_health(self) -> bool:
        """Healthy until closed."""
        return not self._closed

    def close(self) -> None:
        """Stop accepting requests and abort the running ones."""
        self._closed = True
        with self._lock:
            self._aborted.update(self._progress)
            waiting, self._waiting = list(self._waiting.values()), {}
        for _, outer in waiting:  # never started: fail them, none hangs
            outer.set_exception(GenerationError("engine_stopped", "the engine is closed"))
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _generate(self, request: GenerationRequest) -> GenerationResult:
        if request.messages is not None:  # a plain "role: content" template
            rendered = fake_chat_prompt(request.messages)
            result = self._generate(dataclasses.replace(request, prompt=rendered, messages=None))
            return dataclasses.replace(result, prompt=rendered)
        params = request.params.with_defaults(self.default_max_new_tokens)
        if self.crash_on and self.crash_on in request.prompt:
            # Stands in for a segfault or an out-of-memory kill: the process dies.
            os._exit(137)
        prompt_words = len(request.prompt.split())
        if prompt_words > self.max_prompt_words:
            raise GenerationError(
                "prompt_too_long",
                f"the prompt has {prompt_words} words; the limit is {self.max_prompt_words}",
            )
        max_new = params.max_new_tokens or max(1, (params.max_length or 0) - prompt_words)
        words = fake_words(request.prompt, max_new)
        made: list[str] = []
        aborted = False
        stopped = False
        try:
            for word in words:
                with self._lock:
                    aborted = request.id in self._aborted
                if aborted:
                    break
                if self.token_delay_s:
                    time.sleep(self.token_delay_s)
                made.append(word)
                text = " " + " ".join(made)
                with self._lock:
                    self._progress[request.id] = Progress(
                        tokens=len(made), text=text, prompt_tokens=prompt_words
                    )
                if any(s in text for s in params.stop):
                    stopped = True
                    break
        finally:
            with self._lock:
                self._progress.pop(request.id, None)
                self._aborted.discard(request.id)
        text = " " + " ".join(made) if made else ""
        if stopped:
            text = text[: min(text.find(s) for s in params.stop if s in text)]
        reason: FinishReason = "stop" if stopped else "length"
        n = params.num_return_sequences
        logprobs = [fake_logprobs(made, params.top_logprobs)] * n if params.logprobs else None
        return GenerationResult(
            outputs=[text] * n,
            finish_reasons=[reason] * n,
            prompt_tokens=prompt_words,
            completion_tokens=len(made) * n,
            aborted=aborted,
            logprobs=logprobs,
        )


def fake_engine_from_spec(
    spec: str, default_max_new_tokens: int, *, name: str | None = None
) -> FakeEngine:
    """A fake engine from a model name ``fake`` or ``fake:key=value,...``.

    Keys: ``token_delay_s`` (float), ``max_prompt_words`` (int), and ``crash_on``
    (a prompt containing it kills the worker process, for fault tests).
    """
    _, _, options = spec.partition(":")
    kwargs: dict[str, str] = dict(item.split("=", 1) for item in options.split(",") if "=" in item)
    unknown = set(kwargs) - {"token_delay_s", "max_prompt_words", "crash_on"}
    if unknown:
        raise ValueError(f"unknown fake engine options: {sorted(unknown)}")
    return FakeEngine(
        name=name or spec,
        default_max_new_tokens=default_max_new_tokens,
        token_delay_s=float(kwargs.get("token_delay_s", 0.0)),
        max_prompt_words=int(kwargs.get("max_prompt_words", 1024)),
        crash_on=kwargs.get("crash_on"),
    )
