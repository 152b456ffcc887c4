"""The benchmark's model and prompts: the same for every system measured.

The model is ``GPT2Config()`` with seeded random weights (the real 124M GPT-2 shape
and cost) and the real GPT-2 tokenizer from ``../shared/models/gpt2-tokenizer``;
where that folder is absent, a synthetic word-level tokenizer with GPT-2's 50,257
tokens stands in, so the model keeps its shape. The embedding row of the eos token is
zeroed: the LM head is tied to it, so the eos logit is exactly 0 while the largest
of 50k random logits is positive, and greedy decoding never stops early. Every system
therefore generates exactly ``max_new_tokens`` per prompt (the benchmark still counts
the tokens actually generated).
"""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parents[1]
GPT2_TOKENIZER = REPO.parent / "shared" / "models" / "gpt2-tokenizer"
VOCAB_SIZE = 50_257
EOS = "<|endoftext|>"

Workload = Literal["uniform", "mixed", "plumbing", "beam"]


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One job: its text, its token ids (as the tokenizer reads the text) and its length."""

    text: str
    ids: tuple[int, ...]
    max_new_tokens: int


def load_tokenizer() -> tuple[Any, str]:
    """The real GPT-2 tokenizer when present, else a synthetic one; and which it is."""
    from transformers import AutoTokenizer

    if (GPT2_TOKENIZER / "vocab.json").is_file():
        return AutoTokenizer.from_pretrained(GPT2_TOKENIZER), "gpt2 (shared/models)"
    return _synthetic_tokenizer(), "synthetic word-level, 50257 tokens"


def _synthetic_tokenizer() -> Any:
    """Words ``w0`` .. ``w50255`` plus eos: GPT-2's vocabulary size, exact round trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB_SIZE - 1)}
    vocab[EOS] = VOCAB_SIZE - 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast: Any = PreTrainedTokenizerFast
    return fast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS)


def build_model_dir(target: Path, *, seed: int = 0) -> tuple[Path, str]:
    """Save the seeded random GPT-2 (fp32) and its tokenizer under ``target``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer, tokenizer_kind = load_tokenizer()
    eos = tokenizer.eos_token_id
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB_SIZE, bos_token_id=eos, eos_token_id=eos)
    model: Any = GPT2LMHeadModel(config)
    model.eval()
    with torch.no_grad():
        # Tied LM head: eos gets logit 0 and greedy decoding never chooses it.
        model.transformer.wte.weight[eos].zero_()
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target, tokenizer_kind


def _word_ids(tokenizer: Any) -> list[int]:
    """Token ids that are whole lowercase words after a space: they survive a round trip."""
    vocab: dict[str, int] = tokenizer.get_vocab()
    pattern = re.compile(r"^(\u0120[a-z]{3,}|w\d+)$")
    eos = tokenizer.eos_token_id
    return sorted(i for t, i in vocab.items() if pattern.match(t) and i != eos)


def make_prompts(
    tokenizer: Any,
    n: int,
    *,
    prompt_len: tuple[int, int],
    new_tokens: tuple[int, int],
    seed: int,
) -> list[Prompt]:
    """``n`` prompts with lengths and ``max_new_tokens`` drawn uniformly from the ranges.

    The text is random words; ``ids`` is what the tokenizer makes of the text (what the
    genq worker sees too), which may differ by a token or so from the drawn length.
    """
    rng = random.Random(seed)
    words = _word_ids(tokenizer)
    prompts = []
    for _ in range(n):
        length = rng.randint(*prompt_len)
        drawn = [rng.choice(words) for _ in range(length)]
        text = tokenizer.decode(drawn).strip()
        ids = tuple(tokenizer(text)["input_ids"])
        prompts.append(Prompt(text=text, ids=ids, max_new_tokens=rng.randint(*new_tokens)))
    return prompts


def workload_prompts(tokenizer: Any, workload: Workload, n: int, seed: int) -> list[Prompt]:
    """The prompts of ``uniform`` (16-32 tokens, 64 new) or ``mixed`` (8-200, 8-128 new)."""
    if workload == "uniform":
        return make_prompts(tokenizer, n, prompt_len=(16, 32), new_tokens=(64, 64), seed=seed)
    if workload == "mixed":
        return make_prompts(tokenizer, n, prompt_len=(8, 200), new_tokens=(8, 128), seed=seed)
    raise ValueError(f"no model prompts for workload {workload!r}")
