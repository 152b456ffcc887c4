"""Files: uploads stored in the database in chunks, and batches' result files.

An upload is read in chunks of at most 1 MiB from its (spooled) file object and
written as ``file_chunk`` rows, so memory stays flat however large it is. A
batch's output and error files are "virtual": a ``file`` row whose content is made,
when read, from the batch's job rows (one pass over a server-side cursor), so the
results are stored once and the files are always consistent with the jobs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import time
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO, Literal

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from core import text
from core.errors import InvalidRequestError, NotFoundError, TooLargeError
from core.models import File, FileChunk, utcnow
from core.openai_format import unix

CHUNK_BYTES = 1024 * 1024
PURPOSES = ("batch",)
OUTPUT_PURPOSE = "batch_output"


class NoSuchFileError(NotFoundError):
    """No file with that id (or not visible to the caller)."""

    def __init__(self, file_id: str, *, param: str = "file_id") -> None:
        super().__init__(f"no file with id {file_id!r}", param=param)
        self.file_id = file_id


class FileTooLargeError(TooLargeError):
    """The upload is over GENQ_MAX_FILE_BYTES."""

    code = "file_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the file is larger than the limit of {limit} bytes (GENQ_MAX_FILE_BYTES)",
            param="file",
        )
        self.limit = limit


class TooManyLinesError(InvalidRequestError):
    """The upload has more requests than a batch may."""

    code = "too_many_lines"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the file has more than {limit} requests, the limit per batch (GENQ_MAX_BATCH_LINES)",
            param="file",
        )
        self.limit = limit


def new_file_id() -> str:
    """A time-ordered id like OpenAI's ``file-...``."""
    return f"file-{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


def iter_lines(chunks: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line without its newline) over a chunked byte stream."""
    number = 0
    rest = b""
    for chunk in chunks:
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        for part in parts:
            number += 1
            yield number, part
    if rest:
        yield number + 1, rest


def iter_bounded_lines(
    chunks: Iterable[bytes], max_line_bytes: int
) -> Iterator[tuple[int, bytes | None]]:
    """Like :func:`iter_lines`, but a line longer than ``max_line_bytes`` is yielded
    as None and its bytes are dropped as they come, so memory stays bounded
    whatever one line holds."""
    number = 0
    rest = b""
    oversized = False  # the current line already went past the limit
    for chunk in chunks:
        parts = chunk.split(b"\n")
        last = parts.pop()
        for part in parts:
            number += 1
            line = rest + part
            yield number, None if oversized or len(line) > max_line_bytes else line
            rest, oversized = b"", False
        if not oversized:
            rest += last
            if len(rest) > max_line_bytes:
                rest, oversized = b"", True
    if rest or oversized:
        yield number + 1, None if oversized else rest


@dataclasses.dataclass(frozen=True)
class Upload:
    """A stored upload's row and the SHA-256 of its content."""

    file: File
    sha256: str


def store_upload(
    session: Session,
    stream: BinaryIO,
    *,
    owner: str,
    filename: str,
    purpose: str,
    max_bytes: int,
    max_lines: int,
) -> Upload:
    """Write an upload into ``file`` and ``file_chunk`` rows (not committed).

    Raises :class:`FileTooLargeError` or :class:`TooManyLinesError`; the caller
    rolls back.
    """
    text.check(filename, "file")  # the multipart part's filename
    file_id = new_file_id()
    session.add(
        File(
            id=file_id,
            owner=owner,
            purpose=purpose,
            filename=filename[:255],
            bytes=0,
            lines=0,
            created_at=utcnow(),
        )
    )
    session.flush()
    size = 0
    lines = 0
    seq = 0
    tail_blank = True  # whether the current (unfinished) line is blank so far
    digest = hashlib.sha256()
    while chunk := stream.read(CHUNK_BYTES):
        size += len(chunk)
        digest.update(chunk)
        if size > max_bytes:
            raise FileTooLargeError(max_bytes)
        for part_index, part in enumerate(chunk.split(b"\n")):
            if part_index > 0:
                lines += 0 if tail_blank else 1
                tail_blank = True
            tail_blank = tail_blank and not part.strip()
        if lines > max_lines:
            raise TooManyLinesError(max_lines)
        session.execute(insert(FileChunk).values(file_id=file_id, seq=seq, data=chunk))
        seq += 1
    lines += 0 if tail_blank else 1
    if lines > max_lines:
        raise TooManyLinesError(max_lines)
    file = session.get_one(File, file_id)
    file.bytes = size
    file.lines = lines
    session.flush()
    return Upload(file, digest.hexdigest())


def iter_chunks(session: Session, file_id: str) -> Iterator[bytes]:
    """A stored file's content, one chunk (≤ 1 MiB) in memory at a time."""
    seq = 0
    while True:
        data = session.scalar(
            select(FileChunk.data).where(FileChunk.file_id == file_id, FileChunk.seq == seq)
        )
        if data is None:
            return
        yield data
        seq += 1


def exists(session: Session, file_id: str) -> bool:
    """Whether a file with that id exists (whoever owns it)."""
    return session.scalar(select(File.id).where(File.id == file_id)) is not None


def get_file(session: Session, file_id: str, *, owner: str | None) -> File:
    """The file, if it exists and ``owner`` (None: anyone) may see it."""
    file = session.get(File, file_id)
    if file is None or (owner is not None and file.owner != owner):
        raise NoSuchFileError(file_id)
    return file


def list_files(
    session: Session,
    *,
    owner: str | None,
    purpose: str | None,
    limit: int,
    after: str | None,
    order: Literal["asc", "desc"],
) -> tuple[list[File], bool]:
    """Files by creation time; ``after`` is the last id of the previous page."""
    query = select(File).limit(limit + 1)
    query = query.order_by(File.id.desc() if order == "desc" else File.id.asc())
    if owner is not None:
        query = query.where(File.owner == owner)
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    if after is not None:
        query = query.where(File.id < after if order == "desc" else File.id > after)
    rows = list(session.scalars(query))
    return rows[:limit], len(rows) > limit


def delete_file(session: Session, file_id: str, *, owner: str | None) -> None:
    """Delete a file and its content. A batch's jobs keep their prompts and results."""
    file = get_file(session, file_id, owner=owner)
    session.execute(delete(FileChunk).where(FileChunk.file_id == file.id))
    session.delete(file)
    session.flush()


def file_object(file: File) -> dict[str, Any]:
    """OpenAI's file object."""
    return {
        "id": file.id,
        "object": "file",
        "bytes": file.bytes,
        "created_at": unix(file.created_at),
        "filename": file.filename,
        "purpose": file.purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }
