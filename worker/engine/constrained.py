"""Grammar-constrained decoding: a per-row token mask from llguidance.

A constrained request owns one :class:`llguidance.LLMatcher` per row. Before a row's
token is chosen, the matcher writes the set of tokens that keep the output inside the
grammar as a bitmask (32 tokens per int32), which becomes ``-inf`` on the row's
logits; after the choice the matcher consumes the token. Constrained and free rows
share the forward pass: only the rows that ask for it pay for a mask (measured in
bench/constrained.py). When the grammar is complete the mask allows only the EOS
token(s), so the row ends as any row does, on EOS.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import llguidance
import llguidance.hf
import torch

from core.schemas import GenerationParams
from core.structured import UnsupportedSchemaError, grammar_for
from worker.engine.base import GenerationError

_BITS = torch.arange(32, dtype=torch.int32)
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class _TokenTable:
    """A tokenizer as llguidance's ``TokenizerWrapper`` reads it: each token's bytes.

    For tokenizers llguidance cannot read from their tokenizer.json (it knows
    byte-level decoders; not e.g. a Metaspace one): SentencePiece's ``▁`` is a space,
    ``<0xAB>`` a byte, special tokens have no bytes. Text is tokenized greedily
    (longest known bytes first), not by the tokenizer itself: a Metaspace tokenizer
    prepends a space to any text, which is not the text llguidance asked for.
    """

    def __init__(self, tokenizer: Any, vocab: int, eos_id: int) -> None:
        self.eos_token_id = eos_id
        self.bos_token_id = tokenizer.bos_token_id
        special = set(tokenizer.all_special_ids)
        self.special_token_ids = sorted(i for i in special if i < vocab)
        pieces = tokenizer.convert_ids_to_tokens(list(range(min(vocab, len(tokenizer)))))
        self.tokens = [self._bytes(i, piece, special) for i, piece in enumerate(pieces)]
        self.tokens += [b""] * (vocab - len(self.tokens))
        self._ids: dict[bytes, int] = {}
        for token_id, data in enumerate(self.tokens):
            if data:
                self._ids.setdefault(data, token_id)
        self._longest = max((len(b) for b in self._ids), default=1)

    @staticmethod
    def _bytes(token_id: int, piece: str | None, special: set[int]) -> bytes:
        if piece is None or token_id in special:
            return b""
        match = _BYTE_TOKEN.fullmatch(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        return piece.replace("\u2581", " ").encode()

    def __call__(self, text: str | bytes) -> list[int]:
        data = text.encode() if isinstance(text, str) else text
        ids: list[int] = []
        start = 0
        while start < len(data):
            for end in range(min(len(data), start + self._longest), start, -1):
                token_id = self._ids.get(data[start:end])
                if token_id is not None:
                    ids.append(token_id)
                    start = end
                    break
            else:
                start += 1  # a byte no token holds: it cannot be generated anyway
        return ids


def _ll_tokenizer_of(tokenizer: Any, vocab: int, eos_ids: list[int]) -> llguidance.LLTokenizer:
    try:
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=eos_ids)
    except ValueError:  # a decoder llguidance cannot read: give it the tokens' bytes
        table = _TokenTable(tokenizer, vocab, eos_ids[0])
        return llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(table), n_vocab=vocab, eos_token=eos_ids
        )


def logits_width(model: Any) -> int:
    """The vocabulary the logits cover (may exceed the tokenizer's: padded embeddings)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[rows, ceil(vocab/32)]`` int32 bits → ``[rows, vocab]`` bool (True: allowed)."""
    bits = (bitmask.unsqueeze(-1) >> _BITS) & 1
    return bits.view(bitmask.shape[0], -1)[:, :vocab].bool()


class Constraint:
    """The matchers of one request's rows (its ``num_return_sequences``)."""

    def __init__(self, matchers: list[llguidance.LLMatcher], vocab: int) -> None:
        self.matchers = matchers
        self.vocab = vocab
        self.words = (vocab + 31) // 32

    def fill(self, bitmask: torch.Tensor, start: int) -> None:
        """Write the rows' allowed tokens into ``bitmask[start : start + n]`` (int32,
        contiguous, on the CPU), so many requests' masks are unpacked and applied at once.

        Raises :class:`GenerationError` if a matcher is in an error state (it cannot
        say what is allowed; the request fails, not the batch).
        """
        for i, matcher in enumerate(self.matchers):
            if matcher.is_error():
                raise GenerationError(
                    "constraint_failed", f"structured output failed: {matcher.get_error()}"
                )
            row = bitmask[start + i]
            matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def allowed(self) -> torch.Tensor:
        """``[n, vocab]`` bool: the tokens each row may take next."""
        bitmask = torch.zeros((len(self.matchers), self.words), dtype=torch.int32)
        self.fill(bitmask, 0)
        return unpack_bitmask(bitmask, self.vocab)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """The request's ``[n, vocab]`` logits with every disallowed token at ``-inf``."""
        allowed = self.allowed().to(logits.device)
        return logits.masked_fill(~allowed, float("-inf"))

    def consume(self, row: int, token: int) -> None:
        """Advance a row's matcher by its chosen token; raise if the grammar refuses it."""
        matcher = self.matchers[row]
        if not matcher.consume_token(token):
            raise GenerationError(
                "constraint_failed",
                f"structured output failed at token {token}: {matcher.get_error()}",
            )

    def finished(self, row: int) -> bool:
        """Whether the row's grammar is complete and allows nothing more (not even text)."""
        return bool(self.matchers[row].is_stopped())


class GrammarCompiler:
    """Builds :class:`Constraint` objects for one model's tokenizer.

    Wrapping the tokenizer for llguidance costs ~0.4 s on a 50k vocabulary, so it is
    done once, on the first constrained request (a worker that never gets one never
    pays). ``vocab`` is the width of the model's logits, which may exceed the
    tokenizer's size (padded embeddings): those extra ids are never allowed.
    """

    def __init__(self, tokenizer: Any, vocab: int, eos_ids: frozenset[int]) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab = vocab
        self.eos_ids = sorted(eos_ids)
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._failure: GenerationError | None = None

    def _ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._failure is not None:
                raise self._failure
            if self._tokenizer is None:
                if not self.eos_ids:
                    self._failure = GenerationError(
                        "unsupported_model",
                        "structured output needs a model with an EOS token; this one has none",
                    )
                    raise self._failure
                try:
                    self._tokenizer = _ll_tokenizer_of(self._hf_tokenizer, self.vocab, self.eos_ids)
                except Exception as exc:  # never the scheduler's death: this request's
                    self._failure = GenerationError(
                        "unsupported_model",
                        f"structured output is not available for this model's tokenizer: {exc}",
                    )
                    raise self._failure from exc
            return self._tokenizer

    def constraint_for(self, params: GenerationParams, rows: int) -> Constraint | None:
        """The constraint of a request's ``rows`` rows, or None for free text.

        Raises :class:`GenerationError` (``invalid_request``) for a schema the compiler
        refuses: the API checks the same, so this is for requests from elsewhere.
        """
        try:
            grammar = grammar_for(params.response_format)
        except UnsupportedSchemaError as exc:
            raise GenerationError("invalid_request", str(exc)) from exc
        if grammar is None:
            return None
        tokenizer = self._ll_tokenizer()
        matchers = [llguidance.LLMatcher(tokenizer, grammar, log_level=0) for _ in range(rows)]
        if matchers[0].is_error():
            raise GenerationError(
                "invalid_request", f"unsupported or invalid schema: {matchers[0].get_error()}"
            )
        return Constraint(matchers, self.vocab)
