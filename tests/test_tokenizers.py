"""Token tables and byte offsets on real tokenizers (offline, from the test extras)."""
import numpy as np
import pytest
import quicktok  # pinned by the test extra (quicktok-v1): a broken install fails, never skips
from hypothesis import given, settings
from hypothesis import strategies as st

from xtoken_ext.tokenizers import BOS, EOS, EOT, NORMAL, encode_batch_with_offsets, encode_with_offsets, \
    load_tokenizer, token_table

BYTE_LEVEL = ["llama3", "qwen3", "cl100k", "o200k", "gpt2"]
SAMPLES = [
    "Hello world 2024! 12345678 3.14159",
    "def f(x):\n\treturn x ** 2  # square\n\n\n    pass",
    "emoji 🚀🧑‍🚀 and CJK 中文字符 and ŝ ñ é — “quotes”",
    "   leading and trailing spaces   ",
    "mixed: Привет мир, مرحبا, नमस्ते, 한국어",
]
QUICKTOK = {"llama3": "llama3", "qwen3": "qwen3", "cl100k": "cl100k_base", "o200k": "o200k_base"}


@pytest.mark.parametrize("name", list(QUICKTOK))
def test_converted_tokenizer_matches_quicktok(offline_tok, name):
    enc, tok = quicktok.get_encoding(QUICKTOK[name]), offline_tok(name)
    for text in SAMPLES:
        assert tok(text, add_special_tokens=False)["input_ids"] == enc.encode_ordinary(text), text


@pytest.mark.parametrize("name", BYTE_LEVEL)
def test_byte_level_offsets_slice_canonical_bytes(offline_tok, name):
    tok = offline_tok(name)
    table = token_table(tok)
    assert table.kind == "byte_level" and table.size == len(tok)
    for text in SAMPLES:
        ids, starts, ends = encode_with_offsets(tok, text, add_special_tokens=False)
        raw = text.encode("utf-8")
        # Every token covers exactly its own bytes, the tokens tile the text, offsets are monotone.
        assert [raw[s:e] for s, e in zip(starts, ends)] == [table.token_bytes[i] for i in ids]
        assert starts[0] == 0 and ends[-1] == len(raw) and np.all(starts[1:] == ends[:-1])


def test_llama_bos_is_zero_width_role_marker(offline_tok):
    tok = offline_tok("llama3")
    table = token_table(tok)
    ids, starts, ends = encode_with_offsets(tok, "Hello world.")
    assert ids[0] == tok.bos_token_id == 128000 and starts[0] == ends[0] == 0
    assert table.token_bytes[ids[0]] == b"\xff<bos>" and table.roles[ids[0]] == BOS
    assert table.roles[tok.eos_token_id] == EOS and table.roles[9906] == NORMAL
    assert table.token_bytes[tok.convert_tokens_to_ids("Ġworld")] == b" world"
    assert table.token_bytes[tok.convert_tokens_to_ids("Ċ")] == b"\n"


def test_end_of_turn_markers_share_one_role_across_families(offline_tok):
    tables = {name: token_table(offline_tok(name)) for name in ("llama3", "qwen3", "mistral-spm")}
    eot = {"llama3": "<|eot_id|>", "qwen3": "<|im_end|>"}
    for name, text in eot.items():
        i = offline_tok(name).convert_tokens_to_ids(text)
        assert tables[name].roles[i] == EOT and tables[name].token_bytes[i] == b"\xff<eot>", name
        assert int((tables[name].roles == EOT).sum()) == 1, name
    assert not (tables["mistral-spm"].roles == EOT).any()  # no end-of-turn token; its </s> is EOS
    assert tables["qwen3"].token_bytes[offline_tok("qwen3").convert_tokens_to_ids("<|im_start|>")] == b"\xff<|im_start|>"


def test_sentencepiece_table_and_offsets(offline_tok):
    tok = offline_tok("mistral-spm")
    table = token_table(tok)
    assert table.kind == "sentencepiece"
    assert table.token_bytes[tok.convert_tokens_to_ids("▁Hello")] == b" Hello"
    assert table.token_bytes[tok.convert_tokens_to_ids("<0x0A>")] == b"\n"
    assert table.token_bytes[tok.bos_token_id] == b"\xff<bos>"
    text = "Hello  world\n\t中文 ⅷ"
    ids, starts, ends = encode_with_offsets(tok, text, add_special_tokens=False)
    raw = text.encode("utf-8")
    assert np.all(starts <= ends) and np.all(starts[1:] >= ends[:-1]) and ends[-1] == len(raw)
    # The first token's "▁" stands for no text (SentencePiece prepends it); all later tokens cover their bytes.
    assert raw[starts[0]:ends[0]] == b"Hello" and table.token_bytes[ids[0]] == b" Hello"
    assert [raw[s:e] for s, e in zip(starts[1:], ends[1:])] == [table.token_bytes[i] for i in ids[1:]]


@settings(max_examples=60)
@given(st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40))
def test_offsets_tile_any_text(text):
    from xtoken_ext.testing import offline_tokenizer

    for name in ("llama3", "gpt2"):
        tok = offline_tokenizer(name)
        table = token_table(tok)
        ids, starts, ends = encode_with_offsets(tok, text, add_special_tokens=False)
        raw = text.encode("utf-8")
        assert b"".join(table.token_bytes[i] for i in ids) == raw
        assert [raw[s:e] for s, e in zip(starts, ends)] == [table.token_bytes[i] for i in ids]


def test_batch_matches_single(offline_tok):
    tok = offline_tok("qwen3")
    batch = encode_batch_with_offsets(tok, SAMPLES)
    for text, (ids, s, e) in zip(SAMPLES, batch):
        ids1, s1, e1 = encode_with_offsets(tok, text)
        assert np.array_equal(ids, ids1) and np.array_equal(s, s1) and np.array_equal(e, e1)


def test_bad_input(offline_tok):
    with pytest.raises(TypeError, match="fast"):
        load_tokenizer(object())
    with pytest.raises(TypeError, match="str"):
        encode_batch_with_offsets(offline_tok("gpt2"), ["ok", b"bytes"])
    ids, s, e = encode_with_offsets(offline_tok("gpt2"), "")
    assert len(ids) == len(s) == len(e) == 0


def test_sentencepiece_prepended_space_before_multibyte_char_is_zero_width(offline_tok):
    tok = offline_tok("mistral-spm")
    for text, want in [("中文 ok", [(0, 0), (0, 3), (3, 6), (6, 9)]), ("ŝ", [(0, 0), (0, 1), (1, 2)])]:
        ids, starts, ends = encode_with_offsets(tok, text, add_special_tokens=False)
        assert tok.convert_ids_to_tokens(ids.tolist())[0] == "▁"
        assert list(zip(starts.tolist(), ends.tolist())) == want


def test_a_template_eos_at_0_0_leaves_a_one_token_text_its_span(offline_tok):
    """A SentencePiece template that appends EOS ("<s> $A </s>", Llama-2 style) gives the EOS the offsets (0, 0): its
    start before the previous token's end read as a token split inside one char, and "▁Yes" of "Yes" got (0, 0), so
    no chunk of a one-token text was correct."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    import xtoken_ext as xt
    tk = Tokenizer.from_str(offline_tok("mistral-spm").backend_tokenizer.to_str())
    tk.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    for text, want in [("Yes", [(0, 0), (0, 3), (3, 3)]), ("中", [(0, 0), (0, 0), (0, 3), (3, 3)])]:
        ids, starts, ends = encode_with_offsets(tok, text)
        assert list(zip(starts.tolist(), ends.tolist())) == want, text
    chunks, correct = xt.Aligner(tok, offline_tok("llama3")).align("Yes", return_correct=True)
    assert correct.tolist() == [False, False, True, False]  # <s> and <|begin_of_text|> gaps, "Yes", </s> gap


def test_text_a_normalizer_rewrote_stays_with_the_token_before(offline_tok):
    """Qwen3's NFC normalizer composes " e" + U+0301 into " é" and gives it the span of " e": the mark was outside
    every token, so the next chunk started one char late on that side and " world" was never correct."""
    import xtoken_ext as xt
    q, text = offline_tok("qwen3"), "hello e\u0301 world e\u0301"
    ids, starts, ends = encode_with_offsets(q, text)
    assert q.convert_ids_to_tokens(ids.tolist()) == ["hello", "ĠÃ©", "Ġworld", "ĠÃ©"]
    assert list(zip(starts.tolist(), ends.tolist())) == [(0, 5), (5, 9), (9, 15), (15, 19)]
    al = xt.Aligner(offline_tok("llama3"), q)
    chunks, correct = al.align(text, return_correct=True)
    ids_chunks, ids_correct = al.align_ids(al.student_tok(text)["input_ids"], q(text)["input_ids"],
                                           return_correct=True)
    world = [k for k, c in enumerate(chunks.tolist()) if c[2:] == [2, 3]]
    assert len(world) == 1 and correct[world[0]] and int(correct.sum()) == int(ids_correct.sum())


def test_trimmed_offsets_get_their_leading_whitespace_back(offline_tok):
    """trim_offsets=True (RoBERTa's and many GPT-NeoX-style post-processors) leaves a token's leading space out of
    its span ("Ġworld" at "world", a lone "Ġ" zero-width): the text path then marked " world" against " world"
    incorrect (3 of 14 chunks correct on a plain sentence, 13 on ids). Byte offsets now equal the untrimmed ones."""
    import copy
    import random

    import xtoken_ext as xt
    from tokenizers import processors

    plain, teacher = offline_tok("gpt2"), offline_tok("llama3")
    trimmed = copy.deepcopy(plain)
    trimmed.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    rnd = random.Random(0)
    alpha = [" ", "  ", "\n", "\t", "a", "bc", "é", "😀", "中", "1", "23", ".", "\u00a0", "x y"]
    texts = ["Hello world,  the  quick\n\n brown fox.\n", "  lead and trail  ", "x\u00a0y  é 😀 z", " ", ""]
    texts += ["".join(rnd.choice(alpha) for _ in range(rnd.randint(1, 12))) for _ in range(300)]
    raw = [tok(texts, return_offsets_mapping=True)["offset_mapping"] for tok in (plain, trimmed)]
    assert sum(a != b for a, b in zip(*raw)) > 100  # HF trims: the repair has work to do
    for a, b in zip(encode_batch_with_offsets(plain, texts), encode_batch_with_offsets(trimmed, texts)):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    text = "Hello world, the quick brown fox jumps over the lazy dog."
    _, correct = xt.Aligner(trimmed, teacher).align(text, return_correct=True)
    assert correct.sum() == xt.Aligner(plain, teacher).align(text, return_correct=True)[1].sum() == 13
    # The trim takes spaces off both ends of a token: Qwen3's "ĉĠĠ" kept only "\t" and "ĠĊ" only "\n", and the
    # repair put back only a leading run it took to be all of the token's whitespace: chunks marked incorrect
    code = ["def f(x):\n    if x:\n\t\treturn x \n    return  \n", "a \n b", "x\t   y", "  \n\n   z  ",
            "x e\u0301", "中   .  e\u0301e\u0301 e\u0301😀"]  # NFC rewrites " e" + U+0301: its leading space alone
    plain = offline_tok("qwen3")
    trimmed = copy.deepcopy(plain)
    trimmed.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    pieces = [t for x in code for t in plain.tokenize(x)]
    assert {"ĠĊ", "ĉĠĠ", "ĠĠĊ", "ĠĠĊĊ"} <= set(pieces)
    for a, b in zip(*(encode_batch_with_offsets(t, code, add_special_tokens=False) for t in (plain, trimmed))):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    for x in code:
        assert xt.Aligner(trimmed, teacher).align(x, return_correct=True)[1].tolist() == \
            xt.Aligner(plain, teacher).align(x, return_correct=True)[1].tolist()


def test_model_unk_without_a_declared_unk_token_is_unk(offline_tok):
    """A Unigram model's unk id that the HF wrapper does not declare (no unk_token) was a normal token with the
    bytes b"<unk>": W mapped it to '<', 'unk', '>' and [▁, <unk>] (from "ÄÖ") aligned as correct to a teacher's
    " <unk>" text."""
    import xtoken_ext as xt
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from xtoken_ext.tokenizers import UNK

    vocab = [("<unk>", 0.0), ("▁", -1.0)] + [(c, -2.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tk = Tokenizer(models.Unigram(vocab, unk_id=0))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    s = PreTrainedTokenizerFast(tokenizer_object=tk)
    assert s.unk_token is None and s("ÄÖ", add_special_tokens=False)["input_ids"] == [1, 0]
    assert token_table(s).roles[0] == UNK
    t = offline_tok("llama3")
    assert xt.Projection.from_tokenizers(s, t, cache=False, progress=False).row(0) == {}
    _, correct = xt.Aligner(s, t).align_ids([1, 0], t(" <unk>", add_special_tokens=False)["input_ids"],
                                            return_correct=True)
    assert not correct.any()


def test_word_marker_tokenizers_are_refused():
    """WordPiece ("##ing") and BPE with an end-of-word suffix ("the</w>", CLIP / GPT-1 style) kept the markers as
    bytes: W mapped "##ing" to {"##": 0.909, "ing": 0.091} and no multi-piece word aligned. A clear error instead."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    for model in (models.WordPiece({"[UNK]": 0, "play": 1, "##ing": 2}, unk_token="[UNK]"),
                  models.BPE({"t": 0, "h": 1, "e</w>": 2, "the</w>": 3}, [], end_of_word_suffix="</w>")):
        tk = Tokenizer(model)
        tk.pre_tokenizer = pre_tokenizers.Whitespace()
        with pytest.raises(ValueError, match="word markers .* is not supported"):
            token_table(PreTrainedTokenizerFast(tokenizer_object=tk))


def test_tokenizer_with_an_unused_id_covers_its_top_id(offline_tok):
    """A vocabulary with a hole (an id below len(tok) unused, as tiktoken conversions keep) has an id at len(tok):
    the table of len(tok) ids left it out, so W had no row for it (GPT-2's EOS counted as a padding row) and the
    aligner indexed past the table. The table now reaches the top id; the hole is an empty normal id."""
    import xtoken_ext as xt
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 3}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    assert len(tok) == 3 and tok("b a")["input_ids"] == [3, 1]
    table = token_table(tok)
    assert table.size == 4 and table.token_bytes[2] == b"" and table.roles[2] == NORMAL
    w = xt.Projection.from_tokenizers(tok, tok, cache=False, progress=False)
    assert w.student_vocab_size == w.teacher_vocab_size == 4 and w.row(3) == {3: 1.0} and w.row(2) == {}
    chunks, correct = xt.Aligner(tok, offline_tok("gpt2")).align_ids([3], offline_tok("gpt2").encode("b"),
                                                                      return_correct=True)
    assert chunks.tolist() == [[0, 1, 0, 1]] and correct.all()


def test_table_is_remade_when_an_added_token_becomes_special():
    """Making an already-added token special with add_special_tokens changes neither len(tok) nor a role id, but
    its bytes become a role marker: the cached table was served stale (b"<|im_start|>" as text). (add_tokens with
    special=True of an existing token changes no cheap sign: the walk over the added tokens that caught it cost
    13.7 ms per call with 6,000 added tokens, on every batch.)"""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    tok.add_tokens(["<|im_start|>"])
    i = tok.convert_tokens_to_ids("<|im_start|>")
    assert token_table(tok).token_bytes[i] == b"<|im_start|>"
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    assert len(tok) == i + 1 and token_table(tok).token_bytes[i] == b"\xff<|im_start|>"


def test_cached_table_does_not_keep_its_tokenizer_alive(offline_tok):
    """The cache maps a tokenizer to its table; the table held the tokenizer strongly, so the weak-keyed entry
    never died and every reloaded tokenizer (~90 MB for Llama-3) stayed in memory for the process's life."""
    import copy as copy_
    import gc
    import pickle
    import weakref

    tok = copy_.deepcopy(offline_tok("gpt2"))  # offline_tok's are cached for the session
    table = token_table(tok)
    assert table.tokenizer is tok and token_table(tok) is table
    copy = pickle.loads(pickle.dumps(table))  # a pickled table (inside an Aligner) carries its tokenizer
    assert copy.tokenizer is not tok and copy.token_bytes == table.token_bytes and copy.text(198) == "\n"
    alive = weakref.ref(tok)
    del tok
    gc.collect()
    assert alive() is None
    with pytest.raises(RuntimeError, match="tokenizer was freed"):
        table.tokenizer
    assert copy.tokenizer.decode([198]) == "\n"
    again = pickle.loads(pickle.dumps(table))  # a table whose tokenizer is gone still pickles (a W holds one)
    assert again.token_bytes == table.token_bytes
    with pytest.raises(RuntimeError, match="tokenizer was freed"):
        again.tokenizer
    # a name is loaded and its table holds the tokenizer; the cache serves it again while the tokenizer lives
    assert token_table("offline:gpt2").tokenizer is offline_tok("gpt2")
    assert token_table("offline:gpt2").token_bytes is token_table(offline_tok("gpt2")).token_bytes
