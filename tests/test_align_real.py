"""Aligner on real tokenizers (offline, from the test extras): every non-gap chunk is correct on real texts, for
byte-level BPE pairs and a SentencePiece side, through align(text), align_ids and align_batch."""
import numpy as np
import pytest
import torch

import xtoken_ext as xt
from xtoken_ext.reference import align as ref
from xtoken_ext.tokenizers import encode_with_offsets

TEXTS = [
    "Hello world.",
    "def f(x):\n    return x**2  # square\n\n\tprint(f(3), [i for i in range(10)])\n",
    "Prices: 1234567, 3.14159, -42, 10^9; 2024-11-22 12:34:56 | 000123 | 99999999999",
    "Emoji 😀👍🏽 and flags 🇫🇷🇯🇵, a family 👨‍👩‍👧",
    "中文字符和日本語のテキスト、한국어 텍스트",
    "   leading spaces, trailing   \n\n\n  ",
    "Mixed: café naïve Ελληνικά русский עברית العربية हिन्दी",
    " starts with a space",
    "tabs\tand\r\nCRLF\u00a0nbsp",
]
PAIRS = [("llama3", "qwen3"), ("llama3", "mistral-spm"), ("mistral-spm", "gpt2"), ("qwen3", "cl100k")]


@pytest.fixture(scope="module")
def aligners(offline_tok):
    return {pair: xt.Aligner(offline_tok(pair[0]), offline_tok(pair[1])) for pair in PAIRS}


def _check(al, s_ids, t_ids, chunks, correct):
    """Chunks tile both sides; every non-gap chunk is correct; gaps hold only specials or prefix spaces."""
    i = j = 0
    for (s0, s1, t0, t1), ok in zip(chunks.tolist(), correct.tolist()):
        assert (s0, t0) == (i, j)
        i, j = s1, t1
        if s1 > s0 and t1 > t0:
            assert ok, (s0, s1, t0, t1)
        else:
            for table, ids in ((al.student_table, s_ids[s0:s1]), (al.teacher_table, t_ids[t0:t1])):
                for x in ids:
                    b = table.token_bytes[x]
                    assert b in (b"", b" ") or b.startswith(b"\xff"), b
    assert (i, j) == (len(s_ids), len(t_ids))


@pytest.mark.parametrize("pair", PAIRS, ids=["-".join(p) for p in PAIRS])
def test_real_texts_align_correctly(aligners, pair):
    al = aligners[pair]
    for text in TEXTS:
        s_ids = encode_with_offsets(al.student_tok, text)[0]
        t_ids = encode_with_offsets(al.teacher_tok, text)[0]
        _check(al, s_ids, t_ids, *al.align(text, return_correct=True))
        for ids_in in ((s_ids, t_ids), (s_ids.tolist(), t_ids.tolist()), (torch.from_numpy(s_ids), t_ids)):
            _check(al, s_ids, t_ids, *al.align_ids(*ids_in, return_correct=True))


def test_dp_method_matches_reference_on_real_tokens(offline_tok):
    al = xt.Aligner(offline_tok("llama3"), offline_tok("qwen3"), method="dp")
    text = TEXTS[2] + TEXTS[3] + TEXTS[1]
    s_ids = encode_with_offsets(al.student_tok, text)[0]
    t_ids = encode_with_offsets(al.teacher_tok, text)[0]
    chunks, correct = al.align(text, return_correct=True)
    _check(al, s_ids, t_ids, chunks, correct)
    r_chunks, r_correct = ref.align_tokens([al.student_table.token_bytes[i] for i in s_ids],
                                           [al.teacher_table.token_bytes[i] for i in t_ids], "dp")
    np.testing.assert_array_equal(chunks, r_chunks)
    np.testing.assert_array_equal(correct, r_correct)


def test_o10_bos_on_one_side_real(offline_tok):
    """Llama-3 adds BOS, Qwen3 does not: O-10 through align_batch."""
    al = xt.Aligner(offline_tok("llama3"), offline_tok("qwen3"))
    for method in ("auto", "dp"):
        al.method = method
        a = al.align_batch(["Hello world."])
        assert a.chunks[0].tolist() == [[0, 1, 0, 0], [1, 2, 0, 1], [2, 3, 1, 2], [3, 4, 2, 3]]
        assert a.student_chunk_ids.tolist() == [[1, 2, 3, -1]]
        assert a.teacher_chunk_ids.tolist() == [[2, 3, -1]]
        assert a.chunk_valid.nonzero()[:, 1].tolist() == [2, 3]
        assert a.chunk_correct.tolist() == [[False, True, True, True]]


def test_align_batch_threads_padding_and_truncation(aligners):
    al = aligners[("llama3", "mistral-spm")]
    texts = TEXTS * 3
    one, two = al.align_batch(texts, threads=1), al.align_batch(texts, threads=2)
    for name in ("student_chunk_ids", "teacher_chunk_ids", "chunk_valid", "chunk_correct", "num_chunks", "chunks",
                 "student_ids", "teacher_ids", "student_attention_mask", "teacher_attention_mask"):
        assert torch.equal(getattr(one, name), getattr(two, name)), name
    for b, text in enumerate(texts):
        chunks, correct = al.align(text, return_correct=True)
        k = int(one.num_chunks[b])
        assert one.chunks[b, :k].tolist() == chunks.tolist()
        assert one.chunk_correct[b, :k].tolist() == correct.tolist()
        n = int(one.student_lengths[b])
        assert one.student_ids[b, :n].tolist() == encode_with_offsets(al.student_tok, text)[0].tolist()
        assert not one.student_attention_mask[b, n:].any() and (one.student_chunk_ids[b, n - 1:] == -1).all()
    cut = al.align_batch(texts, max_length=5)
    assert int(cut.student_lengths.max()) <= 5 and int(cut.teacher_lengths.max()) <= 5
    spans = cut.row_spans()
    assert (spans[:, 2] <= 4).all() and (spans[:, 4] <= 4).all()


def test_aligner_bad_input(aligners):
    al = aligners[("llama3", "qwen3")]
    with pytest.raises(ValueError, match="empty"):
        al.align("")
    with pytest.raises(TypeError, match="str"):
        al.align(123)
    with pytest.raises(ValueError, match="UTF-8"):
        al.align(b"\xff\xfe bad")
    with pytest.raises(ValueError, match="UTF-8"):
        al.align("lone \ud800 surrogate")
    with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
        al.align_batch(["ok", ""])
    with pytest.raises(TypeError, match="list of texts"):
        al.align_batch("not a list")
    with pytest.raises(IndexError, match="out of range"):
        al.align_ids([1, 2], [10**9])
    with pytest.raises(IndexError, match="out of range"):
        al.align_ids([-5], [1])
    with pytest.raises(TypeError, match="integers"):
        al.align_ids([1.5], [1])
    with pytest.raises(ValueError, match="1-D"):
        al.align_ids([[1, 2]], [1])
    with pytest.raises(ValueError, match="method"):
        xt.Aligner(al.student_tok, al.teacher_tok, method="nw")
    assert al.align("Hi", return_correct=True)[1].dtype == np.bool_
    assert al.align_ids([], []).shape == (0, 4)
    empty = al.align_batch([])
    assert empty.num_chunks.shape == (0,) and empty.row_spans().shape == (0, 5)


def test_shared_bos_eos_id_pairs_as_either_role(offline_tok):
    """GPT-2's <|endoftext|> is both its BOS and its EOS: it meets the other side's BOS at the start and its EOS
    (or end-of-turn token) at the end, in both directions and both methods (it met no EOS before)."""
    gpt2, llama, qwen = offline_tok("gpt2"), offline_tok("llama3"), offline_tok("qwen3")
    e, hello = gpt2.eos_token_id, gpt2.encode("Hello")
    cases = [(llama, [e, *hello, e], [128000, *llama.encode("Hello", add_special_tokens=False), 128001]),
             (qwen, [*hello, e], [*qwen.encode("Hello"), qwen.convert_tokens_to_ids("<|im_end|>")])]
    for other, g_ids, o_ids in cases:
        for method in ("auto", "dp"):
            for s_tok, t_tok, s_ids, t_ids in ((gpt2, other, g_ids, o_ids), (other, gpt2, o_ids, g_ids)):
                chunks, correct = xt.Aligner(s_tok, t_tok, method=method).align_ids(s_ids, t_ids, return_correct=True)
                assert chunks.tolist() == [[k, k + 1, k, k + 1] for k in range(len(s_ids))], (method, chunks)
                assert correct.all(), (method, s_ids, t_ids, correct)


def test_an_eos_meets_the_end_of_turn_token_of_a_family_without_eos(offline_tok):
    """Qwen3's instruct config makes <|im_end|> its eos_token, so it has no EOS-role id: its end-of-turn token ends
    sequences and meets a base Llama-3's <|end_of_text|> (on_policy appends each side's eos_token_id after a row that
    ended; the pair was incorrect, so never distilled), in both directions and both methods, as W maps them."""
    import copy

    llama, qwen = offline_tok("llama3"), copy.deepcopy(offline_tok("qwen3"))
    qwen.eos_token = "<|im_end|>"
    l_ids = [*llama.encode(" It is 42.", add_special_tokens=False), llama.eos_token_id]
    q_ids = [*qwen.encode(" It is 42.", add_special_tokens=False), qwen.eos_token_id]
    for method in ("auto", "dp"):
        for s_tok, t_tok, s_ids, t_ids in ((llama, qwen, l_ids, q_ids), (qwen, llama, q_ids, l_ids)):
            chunks, correct = xt.Aligner(s_tok, t_tok, method=method).align_ids(s_ids, t_ids, return_correct=True)
            assert chunks[-1].tolist() == [len(s_ids) - 1, len(s_ids), len(t_ids) - 1, len(t_ids)], method
            assert correct[-1], (method, chunks, correct)
    # on_policy appends the teacher id W maps the student's EOS to (Qwen3's <|im_end|> ends turns: Llama-3's
    # <|eot_id|>, not its <|end_of_text|>, which no student row reaches), and the pair is correct and valid
    for s_tok, t_tok, s_ids in ((llama, qwen, l_ids), (qwen, llama, q_ids)):
        w = xt.Projection.from_tokenizers(s_tok, t_tok, cache=False, progress=False)
        (target,) = w.row(s_tok.eos_token_id)
        batch = xt.Collator(s_tok, [t_tok]).on_policy(torch.tensor([s_ids]), prompt_length=1)["teachers"][0]
        assert batch["input_ids"][0, -1] == target
        ali = batch["alignment"]
        k = int(ali.num_chunks[0]) - 1
        assert bool(ali.chunk_correct[0, k]) and bool(ali.chunk_valid[0, k])


def test_auto_ids_with_different_chat_markup(offline_tok):
    """Different chat templates around the same messages: only chunks holding markup (specials or the newlines
    around them) are incorrect; every message token lands in a correct chunk, and both end-of-turn markers
    (<|eot_id|> and <|im_end|>, one role) are correct 1:1 chunks. auto == dp here."""
    s_tok, t_tok = offline_tok("llama3"), offline_tok("qwen3")
    al = xt.Aligner(s_tok, t_tok)
    body = "Hello there, how are you? The answer is 12345.\n" * 3
    s_text = (f"<|start_header_id|>user<|end_header_id|>\n\n{body}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nFine, thanks!<|eot_id|>")
    t_text = f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\nFine, thanks!<|im_end|>"
    s_ids, t_ids = s_tok(s_text)["input_ids"], t_tok(t_text)["input_ids"]
    chunks, correct = al.align_ids(s_ids, t_ids, return_correct=True)
    st, tt = al.student_table.token_bytes, al.teacher_table.token_bytes
    for (s0, s1, t0, t1), ok in zip(chunks.tolist(), correct.tolist()):
        if not ok:
            pieces = [st[i] for i in s_ids[s0:s1]] + [tt[i] for i in t_ids[t0:t1]]
            assert all(p.startswith(b"\xff") or not p.strip() for p in pieces), pieces
    eot = [(s_ids[s0], t_ids[t0]) for (s0, s1, t0, t1), ok in zip(chunks.tolist(), correct.tolist())
           if ok and s1 - s0 == 1 and t1 - t0 == 1 and s_ids[s0] >= 128000]
    assert eot == [(s_tok.convert_tokens_to_ids("<|eot_id|>"), t_tok.convert_tokens_to_ids("<|im_end|>"))] * 2
    assert int(correct.sum()) == len(chunks) - 8
    al.method = "dp"
    dp_chunks, dp_correct = al.align_ids(s_ids, t_ids, return_correct=True)
    np.testing.assert_array_equal(chunks, dp_chunks)
    np.testing.assert_array_equal(correct, dp_correct)


def test_chat_markup_as_specials_vs_text_pieces(offline_tok):
    """Issue 10: a transcript in Qwen3 markup, tokenized with special-token parsing: Qwen3 sees <|im_start|> and
    <|im_end|> as specials, Llama-3 as text pieces. The id path stays in sync across them (a special counts as its
    literal text for synchronization): no correct chunk pairs unrelated pieces, no chunk pairs a special with text
    as correct, and the offset path and the id path mark the same chunks correct. (Before: 36 of 401 chunks paired
    unrelated pieces such as 'im' <-> '.'.)"""
    s_tok, t_tok = offline_tok("llama3"), offline_tok("qwen3")
    al = xt.Aligner(s_tok, t_tok)
    msgs = [("system", "You are a helpful assistant."), ("user", "What is 12345 + 678? Answer briefly."),
            ("assistant", "12345 + 678 = 13023."), ("user", "Thanks! Now <b>bold</b> and\nnew lines\n\n.")] * 4
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in msgs)
    s_ids, t_ids = s_tok(text)["input_ids"], t_tok(text)["input_ids"]
    t_special = set(t_tok.all_special_ids) | {t_tok.convert_tokens_to_ids(x) for x in ("<|im_start|>", "<|im_end|>")}
    assert sum(i in t_special for i in t_ids) == 2 * len(msgs)  # the teacher really sees specials
    offsets_path = al.align(text, return_correct=True)
    for method in ("auto", "dp"):
        al.method = method
        chunks, correct = al.align_ids(s_ids, t_ids, return_correct=True)
        assert _check_chat(s_tok, t_tok, s_ids, t_ids, chunks, correct, t_special) >= 0.8 * len(chunks)
    al.method = "auto"
    ids_path = al.align_ids(s_ids, t_ids, return_correct=True)
    matched = [{tuple(c) for c, ok in zip(ch.tolist(), co.tolist()) if ok} for ch, co in (offsets_path, ids_path)]
    assert matched[0] == matched[1]


def _check_chat(s_tok, t_tok, s_ids, t_ids, chunks, correct, t_special):
    """Every correct chunk decodes to the same text on both sides and holds no teacher special; every teacher
    special sits in an incorrect chunk together with the student pieces of its literal text. Returns the number of
    correct chunks."""
    n_ok = 0
    for (s0, s1, t0, t1), ok in zip(chunks.tolist(), correct.tolist()):
        s_text, t_text = s_tok.decode(s_ids[s0:s1]), t_tok.decode(t_ids[t0:t1])
        if ok:
            n_ok += 1
            assert s_text == t_text and not any(i in t_special for i in t_ids[t0:t1]), (s_text, t_text)
        elif any(i in t_special for i in t_ids[t0:t1]):
            assert s_text.replace("<|begin_of_text|>", "") == t_text, (s_text, t_text)
    return n_ok
