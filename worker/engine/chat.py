"""Rendering chat messages with the tokenizer's own chat template."""

from __future__ import annotations

from typing import Any

from worker.engine.base import GenerationError


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt the model's template makes of ``messages``, ending where the
    assistant's reply begins (``add_generation_prompt``).

    A template may refuse a conversation (many raise on roles that do not alternate,
    or on a system message): that fails the request, with the template's words.
    """
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja2's TemplateError, or what the template raised
        raise GenerationError(
            "invalid_request", f"the model's chat template refused the messages: {exc}"
        ) from exc
    return str(text)
