"""``load_tokenizer`` forms: an HF object, a local folder, ``offline:NAME``, and a ``*.gguf`` file (a tiny
SentencePiece-with-byte-fallback tokenizer written here with the ``gguf`` package), whose conversion is cached on
disk by the file's content hash; the GGUF tokenizer as a byte-fallback student and teacher of W; the CLI."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import transformers

import xtoken_ext as xt
from xtoken_ext.projection import Projection
from xtoken_ext.tokenizers import EOT, cache_dir, file_sha256, load_tokenizer, token_table

SPECIALS = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
PIECES = ["▁", "t", "h", "e", "a", "n", "d", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "!", "th", "▁t", "▁th",
          "▁the", "the", "an", "and", "▁and"]
CHAT_TEMPLATE = "{% for m in messages %}<start_of_turn>{{ m['content'] }}<end_of_turn>{% endfor %}"


def write_gguf(path, pieces=PIECES):
    """A llama-architecture GGUF holding only a SentencePiece vocabulary with byte fallback (no tensors)."""
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((w.add_context_length, 64), (w.add_embedding_length, 8), (w.add_block_count, 1),
                       (w.add_feed_forward_length, 16), (w.add_head_count, 1), (w.add_head_count_kv, 1),
                       (w.add_rope_dimension_count, 8), (w.add_layer_norm_rms_eps, 1e-5)):
        add(value)
    tokens = SPECIALS + BYTES + list(pieces) + ["<end_of_turn>"]
    types = ([gguf.TokenType.UNKNOWN] + [gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.BYTE] * 256
             + [gguf.TokenType.NORMAL] * len(pieces) + [gguf.TokenType.CONTROL])
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces) + 1)])  # merge order: file order
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template(CHAT_TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XTOKEN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture()
def conversions(monkeypatch):
    """gguf_file= calls of AutoTokenizer.from_pretrained (the slow conversion), recorded by file name."""
    calls = []
    original = transformers.AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        if "gguf_file" in kwargs:
            calls.append(kwargs["gguf_file"])
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    return calls


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_gguf_tokenizer_is_converted_once_and_cached_by_content(tmp_path, cache, conversions, tiny_gguf):
    cold = load_tokenizer(tiny_gguf)
    assert conversions == ["tiny.gguf"]
    ids = cold("the and 0123!", add_special_tokens=True)["input_ids"]
    assert cold.convert_ids_to_tokens(ids) == ["<s>", "▁the", "▁and", "▁", "0", "1", "2", "3", "!"]
    assert cold.convert_ids_to_tokens(cold("é", add_special_tokens=False)["input_ids"]) == ["▁", "<0xC3>", "<0xA9>"]
    key = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert [p.name for p in (cache / "gguf").iterdir()] == [f"{key}-transformers{transformers.__version__}"]

    # Same content under another name and path: served from the cache, same tokenizer and chat template.
    copy = shutil.copy(tiny_gguf, tmp_path / "renamed.gguf")
    warm = load_tokenizer(str(copy))
    assert conversions == ["tiny.gguf"]
    assert token_table(warm).fingerprint == token_table(cold).fingerprint
    assert warm.chat_template == cold.chat_template == CHAT_TEMPLATE
    assert warm("the 9!")["input_ids"] == cold("the 9!")["input_ids"]

    # Same size and mtime, different content (the piece "th" renamed "ht"): a new conversion, not the cached one.
    edited = write_gguf(tmp_path / "edited.gguf", [p if p != "th" else "ht" for p in PIECES])
    assert edited.stat().st_size == copy.stat().st_size
    st = os.stat(copy)
    os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns))
    other = load_tokenizer(edited)
    assert conversions == ["tiny.gguf", "edited.gguf"] and len(list((cache / "gguf").iterdir())) == 2
    assert "ht" in other.get_vocab() and "th" not in other.get_vocab()


def test_gguf_roles_and_errors(cache, tiny_gguf):
    tok = load_tokenizer(tiny_gguf)
    table = token_table(tok)
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert table.kind == "sentencepiece" and table.roles[tok.convert_tokens_to_ids("<end_of_turn>")] == EOT
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_tokenizer(cache / "missing.gguf")


def test_gguf_with_an_unwritable_cache_warns_and_loads(tmp_path, monkeypatch, tiny_gguf):
    """A cache folder that cannot be written failed the load ("Not a directory"), even with --no-cache; the W cache
    warns and goes on, and so does this one now, with the tokenizer a cached load gives."""
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("XTOKEN_CACHE", str(tmp_path / "a_file" / "cache"))
    with pytest.warns(UserWarning, match=r"converted but not cached: cannot write .*a_file.*XTOKEN_CACHE"):
        tok = load_tokenizer(tiny_gguf)
    monkeypatch.setenv("XTOKEN_CACHE", str(tmp_path / "cache"))
    cached = load_tokenizer(tiny_gguf)
    assert token_table(tok).fingerprint == token_table(cached).fingerprint
    assert tok("the 0123!")["input_ids"] == cached("the 0123!")["input_ids"]


def test_gguf_path_under_home_is_expanded(cache, monkeypatch, tiny_gguf):
    """"~/x.gguf" was taken literally ("GGUF file not found") while "~/folder" was expanded."""
    monkeypatch.setenv("HOME", str(tiny_gguf.parent))
    assert token_table(load_tokenizer("~/tiny.gguf")).fingerprint == token_table(load_tokenizer(tiny_gguf)).fingerprint


def test_file_sha256_streams_whole_file(tmp_path):
    data = np.random.default_rng(0).bytes(1_000_003)
    (tmp_path / "f").write_bytes(data)
    # A chunk that does not divide the size: every byte, the tail included, enters the hash.
    assert file_sha256(tmp_path / "f", chunk=4096) == file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_offline_folder_and_object_forms(tmp_path, offline_tok):
    gpt2 = offline_tok("gpt2")
    assert load_tokenizer("offline:gpt2") is gpt2 and load_tokenizer(gpt2) is gpt2
    with pytest.raises(ValueError, match="unknown offline tokenizer"):
        load_tokenizer("offline:nope")
    gpt2.save_pretrained(str(tmp_path / "gpt2"))
    for form in (tmp_path / "gpt2", str(tmp_path / "gpt2"), os.fsencode(tmp_path / "gpt2")):
        tok = load_tokenizer(form)
        assert token_table(tok).fingerprint == token_table(gpt2).fingerprint, form
    with pytest.raises(TypeError, match="fast"):
        load_tokenizer(object())


def test_added_tokens_are_their_texts_bytes_and_tables_follow_add_tokens(offline_tok):
    """A byte-level tokenizer matches an added (non-special) token in the raw text, so its canonical bytes are its
    content's UTF-8 ("café" was b"caf\xe9", read through the byte-level alphabet: W mapped it to a lone byte and the
    " café" chunk fell out of KD); a cached table is made again after add_tokens (it kept the old size, and the
    aligner then refused the new id)."""
    import copy

    tok = copy.deepcopy(offline_tok("gpt2"))
    before = token_table(tok)
    tok.add_tokens(["café", "Łódź", "cafe"])
    table = token_table(tok)
    assert len(table.token_bytes) == len(tok) == len(before.token_bytes) + 3
    assert table.fingerprint != before.fingerprint
    assert table.token_bytes[-3:] == ["café".encode(), "Łódź".encode(), b"cafe"]
    llama = offline_tok("llama3")
    for text in ("un café noir", "un cafe noir", "de Łódź"):
        ids, starts, ends = xt.tokenizers.encode_with_offsets(tok, text)
        raw = text.encode()
        assert all(raw[a:b] == table.token_bytes[i] for i, a, b in zip(ids, starts, ends)), text
        a = xt.Aligner(tok, llama).align_batch([text])
        # Llama-3's BOS, then the first word (no student row predicts it), then every chunk is valid
        assert bool(a.chunk_valid[0, 2:int(a.num_chunks[0])].all()) and int(a.num_chunks[0]) > 2, text


def test_gguf_byte_fallback_tokenizer_on_both_sides_of_w(cache, offline_tok, tiny_gguf):
    # Everything that takes a tokenizer takes the .gguf path and offline:NAME.
    P = Projection.from_tokenizers(str(tiny_gguf), "offline:gpt2", cache=False, progress=False)
    tok, gpt2 = load_tokenizer(tiny_gguf), offline_tok("gpt2")
    digits = tok.convert_tokens_to_ids(list("0123456789"))
    fallback = tok.convert_tokens_to_ids([f"<0x{ord(d):02X}>" for d in "0123456789"])
    pairs = dict(zip(*(x.tolist() for x in P.common_pairs("strict"))))
    assert [pairs.get(i) for i in digits] == gpt2.convert_tokens_to_ids(list("0123456789"))
    assert not set(fallback) & set(pairs) and P.audit().classes[0].total == 10
    Q = Projection.from_tokenizers("offline:gpt2", str(tiny_gguf), cache=False, progress=False)
    assert [Q.row(i) for i in gpt2.convert_tokens_to_ids(list("0123456789"))] == [{d: 1.0} for d in digits]
    assert Q.row(gpt2.convert_tokens_to_ids("!")) == {tok.convert_tokens_to_ids("!"): 1.0}


def test_cli_takes_every_form(cache, capsys, tiny_gguf):
    from xtoken_ext.cli import main

    assert main(["audit", str(tiny_gguf), "offline:gpt2", "--no-cache", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["classes"][0]["name"] == "1-digit" and report["classes"][0]["total"] == 10


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("XTOKEN_CACHE", str(tmp_path))
    assert cache_dir("gguf") == tmp_path / "gguf"
    monkeypatch.setenv("XTOKEN_CACHE", "~/xt")  # a quoted ~ reaches us unexpanded; it is not a folder named "~"
    assert cache_dir("gguf") == Path.home() / "xt" / "gguf"
    monkeypatch.delenv("XTOKEN_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "xtoken_ext"


def test_a_folder_without_a_tokenizer_or_a_missing_path_is_named(tmp_path):
    """A folder with only config.json (a checkpoint saved without its tokenizer) loaded as an empty tokenizer that
    encodes every text to nothing (W builds and caches then succeeded on it); a mistyped local path got the hub's
    repo-id error."""
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=100).save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="encodes no text"):
        xt.load_tokenizer(tmp_path / "ckpt")
    for spec in ("./no-such-folder", str(tmp_path / "nope"), "~/no-such-folder-xtoken"):
        with pytest.raises(FileNotFoundError, match="no such folder"):
            xt.load_tokenizer(spec)
    # a tokenizer.json file itself got the hub's repo-id error
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json is a file: give the folder that holds it"):
        xt.load_tokenizer(tmp_path / "tokenizer.json")
