"""Chat: OpenAI's messages, their validation, and the chat completion shapes.

The API neither has torch nor, necessarily, the model's files, so it does not render
a conversation: a chat job keeps its ``messages`` and the worker renders them with
the tokenizer's own chat template (``apply_chat_template(..., add_generation_prompt=
True)``), storing the rendered prompt with the result. Workers advertise in the
registry whether their model has a template, so a chat request for a model without
one is refused up front (422 naming the model).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_MESSAGES = 1024
MAX_CONTENT_CHARS = 200_000


class TextPart(BaseModel):
    """A ``{"type": "text", "text": ...}`` content part (the only kind genq reads)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["text"]
    text: str = Field(max_length=MAX_CONTENT_CHARS)


Content = str | Annotated[list[TextPart], Field(min_length=1, max_length=256)]


class ChatMessage(BaseModel):
    """One message of a conversation, in OpenAI's shape.

    ``developer`` is OpenAI's newer name for ``system``; templates know ``system``,
    so it is rendered as one.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: Content = Field(max_length=MAX_CONTENT_CHARS)
    name: str | None = Field(default=None, min_length=1, max_length=64)

    @field_validator("content", mode="before")
    @classmethod
    def _image_parts_named(cls, value: object) -> object:
        if isinstance(value, list):
            for index, part in enumerate(value):
                if isinstance(part, dict) and part.get("type") not in (None, "text"):
                    raise ValueError(
                        f"content part {index} has type {part.get('type')!r}; genq serves text"
                        " models and reads only text parts"
                    )
        return value

    def text(self) -> str:
        """The content as one string (text parts joined, as OpenAI concatenates them)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


Messages = Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]


def check_conversation(messages: list[ChatMessage]) -> list[ChatMessage]:
    """A conversation to answer must have something to answer: a user message, and
    not end with the assistant (genq does not continue an assistant's message)."""
    if not any(m.role == "user" for m in messages):
        raise ValueError("messages must include at least one user message")
    if messages[-1].role == "assistant":
        raise ValueError("the last message must not be the assistant's: there is nothing to answer")
    return messages


def template_messages(messages: list[ChatMessage] | list[dict[str, Any]]) -> list[dict[str, str]]:
    """Messages as chat templates take them: ``{"role", "content"}`` strings."""
    out = []
    for message in messages:
        m = message if isinstance(message, ChatMessage) else ChatMessage.model_validate(message)
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": m.text()})
    return out
