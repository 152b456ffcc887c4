"""Tiny models for the engine tests, offline.

``tiny_model_dir`` prefers the trained stories260k model from ``../shared/models``
(readable output); where that folder is absent (a fresh clone elsewhere) it
builds a random-weight Llama with a locally trained tokenizer. ``tiny_gpt2_dir``
makes a small random-weight GPT-2 (absolute positions, the other family the
engine must pad exactly for).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
STORIES = SHARED_MODELS / "stories260k"
GPT2_TOKENIZER = SHARED_MODELS / "gpt2-tokenizer"

_CORPUS = [
    "Once upon a time, there was a little girl named Lily.",
    "She loved to play outside in the park with her red ball.",
    "One day, she saw a big dog. The dog was happy and they played together.",
    "The sun was warm and the sky was blue. Tom and Sue went to the shop.",
    "Hello world, the quick brown fox jumps over the lazy dog.",
    # JSON's characters, so structured output can be spelled with this vocabulary.
    '{"name": "Lily", "age": 3, "tags": ["red", "blue"], "ok": true, "x": null} 0123456789',
]


def _local_tokenizer(byte_level: bool) -> Any:
    """A BPE tokenizer trained here on a few sentences (no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token=None if byte_level else "<unk>"))
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = []
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        padding_side="left",
    )


def tiny_model_dir(base: Path) -> Path:
    """The stories260k directory, or a random tiny Llama saved under ``base``."""
    if (STORIES / "config.json").is_file():
        return STORIES
    target = Path(base) / "tiny-llama"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _local_tokenizer(byte_level=False)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def tiny_gpt2_dir(base: Path) -> Path:
    """A 2-layer random GPT-2 with the real GPT-2 tokenizer when available, saved under ``base``."""
    target = Path(base) / "tiny-gpt2"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    if (GPT2_TOKENIZER / "tokenizer.json").is_file():
        tokenizer: Any = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    else:
        tokenizer = _local_tokenizer(byte_level=True)
    eos = tokenizer.eos_token_id
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=256,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    GPT2LMHeadModel(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


# A ChatML-like template, as instruction-tuned models ship in tokenizer_config.json.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ bos_token }}{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}{{ bos_token }}assistant\n{% endif %}"
)


def tiny_chat_model_dir(base: Path) -> Path:
    """The tiny model of :func:`tiny_model_dir` with a chat template in its tokenizer
    config, saved under ``base``."""
    import shutil

    from transformers import AutoTokenizer

    target = Path(base) / "tiny-chat"
    if (target / "config.json").is_file():
        return target
    source = tiny_model_dir(base)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("README*"))
    tokenizer: Any = AutoTokenizer.from_pretrained(target)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(target)
    return target
