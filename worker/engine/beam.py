"""Beam search for one request that owns ``num_beams`` rows of the running batch.

The engine runs the model; this class does what transformers' ``_beam_search`` does
with the logits of one batch item, with the same tensor operations in the same order
(so ``topk`` breaks ties the same way and the float32 sums round the same way):
log-softmax, the logits processors, the top ``(1 + eos count, at least 2) * num_beams``
continuations (drawn without replacement when sampling), the running beams for the
next step, the heap of finished hypotheses with ``length_penalty``, and the
``early_stopping`` rule (True / False / "never"). After each step the engine copies
the parents' keys and values into the rows of their children (:attr:`BeamSearch.sources`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from core.schemas import GenerationParams
from worker.engine.base import FinishReason, GenerationResult
from worker.engine.sampling import SamplingSpec, process_logits

# transformers' "minus infinity" for beam scores: finite, so sums stay comparable.
_NEG = -1.0e9


class BeamSearch:
    """The beams and finished hypotheses of one request (transformers' batch of one)."""

    def __init__(
        self,
        params: GenerationParams,
        prompt_ids: list[int],
        max_new: int,
        eos_ids: frozenset[int],
        generator: torch.Generator | None,
        stop_hit: Callable[[list[int]], bool],
    ) -> None:
        self.num_beams = params.num_beams
        self.num_return = params.num_return_sequences
        self.early_stopping = params.early_stopping
        self.length_penalty = params.length_penalty
        self.spec = SamplingSpec.from_params(params)
        self.generator = generator
        self.eos_ids = eos_ids
        self.stop_hit = stop_hit
        self.prompt_ids = prompt_ids
        self.prompt_len = len(prompt_ids)
        self.max_length = self.prompt_len + max_new  # generate's max_length
        self.keep = max(2, 1 + len(eos_ids)) * self.num_beams
        # min_tokens_to_keep of generate's top-k / top-p warpers under beam sampling.
        self.min_keep = len(eos_ids) + 1 if eos_ids else 2
        self.top_mask = torch.arange(self.keep) < self.num_beams
        # Running beams: generated tokens (all of one length) and accumulated log-probs;
        # only beam 0 counts at first, so the first step does not pick one token n times.
        self.running: list[list[int]] = [[] for _ in range(self.num_beams)]
        self.running_scores = torch.zeros(self.num_beams)
        self.running_scores[1:] = _NEG
        # Finished hypotheses (the heap, kept sorted by score as generate's topk keeps it).
        self.finished: list[list[int]] = [[] for _ in range(self.num_beams)]
        self.finished_scores = torch.full((self.num_beams,), _NEG)
        self.finished_flags = torch.zeros(self.num_beams, dtype=torch.bool)
        self.improvable = True  # generate's is_early_stop_heuristic_unsatisfied
        self.done = False
        self.sources: list[int] = list(range(self.num_beams))

    def step(self, logits: torch.Tensor) -> list[int]:
        """Take the ``[num_beams, vocab]`` float32 logits of the running beams; return the
        token each row feeds next. :attr:`sources` then says, for each row, which row's
        cache it continues (its parent)."""
        vocab = logits.shape[-1]
        cur_len = self.prompt_len + len(self.running[0])
        log_probs = torch.nn.functional.log_softmax(logits, dim=-1)
        history = None
        if self.spec.needs_history:
            history = torch.tensor([self.prompt_ids + r for r in self.running], dtype=torch.long)
        log_probs = process_logits(log_probs, history, self.spec, self.min_keep)
        accumulated = (log_probs + self.running_scores[:, None]).reshape(1, -1)
        if self.spec.do_sample:
            probs = torch.softmax(accumulated, dim=-1)
            if not bool(torch.isfinite(probs).all()):
                raise FloatingPointError("the sampling probabilities are not finite")
            indices = torch.multinomial(probs, num_samples=self.keep, generator=self.generator)
            top = torch.gather(accumulated, 1, indices)
            top, order = top.sort(dim=-1, descending=True)
            indices = indices.gather(-1, order)
        else:
            top, indices = torch.topk(accumulated, k=self.keep)
        top, indices = top[0], indices[0]
        # topk ranks NaN first, and the best is -inf only if every score is: checking the
        # best candidate costs nothing next to a pass over the vocabulary.
        if not bool(torch.isfinite(top[0])):
            raise FloatingPointError("the beam scores are not finite")
        parents = (indices // vocab).tolist()
        tokens = (indices % vocab).tolist()
        candidates = [self.running[p] + [t] for p, t in zip(parents, tokens, strict=True)]
        hits = torch.tensor([self._hits(c, cur_len + 1) for c in candidates], dtype=torch.bool)

        # The running beams: the best candidates that did not just finish.
        running_scores = top + hits.to(torch.float32) * _NEG
        chosen = torch.topk(running_scores, k=self.num_beams)[1].tolist()
        self.running = [candidates[i] for i in chosen]
        self.running_scores = running_scores[chosen]
        self.sources = [parents[i] for i in chosen]

        # The finished heap: the top num_beams candidates that just finished may enter it.
        just_finished = hits & self.top_mask
        scores = top / ((cur_len + 1 - self.prompt_len) ** self.length_penalty)
        full = bool(self.finished_flags.all()) and self.early_stopping is True
        scores += torch.tensor(full).to(torch.float32) * _NEG
        scores += torch.tensor(not self.improvable).to(torch.float32) * _NEG
        scores += (~just_finished) * _NEG
        merged = self.finished + candidates
        merged_scores = torch.cat((self.finished_scores, scores))
        merged_flags = torch.cat((self.finished_flags, just_finished))
        best = torch.topk(merged_scores, k=self.num_beams)[1]
        self.finished = [merged[i] for i in best.tolist()]
        self.finished_scores = merged_scores[best]
        self.finished_flags = merged_flags[best]

        # Can a running beam still beat the worst finished hypothesis?
        cur_len += 1
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_length = self.max_length - self.prompt_len
        else:
            best_length = cur_len - self.prompt_len
        best_possible = self.running_scores[:1] / (best_length**self.length_penalty)
        worst = torch.where(self.finished_flags, torch.min(self.finished_scores), _NEG)
        self.improvable = self.improvable and bool(torch.any(best_possible > worst))
        all_full = bool(self.finished_flags.all()) and self.early_stopping is True
        self.done = not self.improvable or all_full or bool(hits.all())
        return [r[-1] for r in self.running]

    def _hits(self, tokens: list[int], length: int) -> bool:
        """generate's stopping criteria for a candidate: max_length, eos, a stop string."""
        return length >= self.max_length or tokens[-1] in self.eos_ids or self.stop_hit(tokens)

    @property
    def best_running(self) -> list[int]:
        """The tokens of the best running beam (for progress)."""
        return self.running[0]

    def result(
        self, decode: Callable[[list[int]], tuple[str, bool]], aborted: bool
    ) -> GenerationResult:
        """The ``num_return_sequences`` best hypotheses. ``decode`` gives a token list's
        text and whether a stop string cut it. An aborted search returns its best
        hypotheses so far, finished or running."""
        hypotheses = self.finished[: self.num_return]
        if aborted and not bool(self.finished_flags[: self.num_return].all()):
            hypotheses = self.running[: self.num_return]
        outputs: list[str] = []
        reasons: list[FinishReason] = []
        for tokens in hypotheses:
            text, stopped = decode(tokens)
            outputs.append(text)
            eos = bool(tokens) and tokens[-1] in self.eos_ids
            reasons.append("stop" if stopped else "eos" if eos else "length")
        return GenerationResult(
            outputs=outputs,
            finish_reasons=reasons,
            prompt_tokens=self.prompt_len,
            completion_tokens=sum(len(t) for t in hypotheses),
            aborted=aborted,
        )
