"""Aligner: C++ (xtoken_ext._C) == pure-Python reference, structural properties, METHOD.md oracles O-8..O-11,
the Alignment object, and bad input. Token streams here are hand-made canonical bytes (no tokenizer needed)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xtoken_ext import _C
from xtoken_ext.alignment import Alignment
from xtoken_ext.reference import align as ref

BOS = b"\xff<bos>"
ALPHABET = b"ab1 .\n\xc3\xa9"  # includes the two bytes of a UTF-8 char, so splits can cut a character


@st.composite
def texts(draw, max_size=40):
    return bytes(draw(st.lists(st.sampled_from(ALPHABET), max_size=max_size)))


@st.composite
def split(draw, text, max_piece=4):
    """Cut `text` into tokens of 1..max_piece bytes."""
    out, i = [], 0
    while i < len(text):
        k = draw(st.integers(1, max_piece))
        out.append(text[i:i + k])
        i += k
    return out


@st.composite
def edited(draw, text):
    """Random byte-level edits: insertions, deletions, substitutions."""
    b = bytearray(text)
    for _ in range(draw(st.integers(0, 4))):
        p = draw(st.integers(0, len(b)))
        op = draw(st.sampled_from("ids"))
        if op == "i":
            b[p:p] = bytes([draw(st.sampled_from(ALPHABET))])
        elif p < len(b):
            if op == "d":
                del b[p]
            else:
                b[p] = draw(st.sampled_from(b"xyz"))
    return bytes(b)


@st.composite
def stream_pair(draw, edit: bool):
    """Two token streams of one text (or of an edited copy), optionally with BOS / empty tokens sprinkled in."""
    text = draw(texts())
    s = draw(split(text))
    t = draw(split(draw(edited(text)) if edit else text))
    if draw(st.booleans()):
        s.insert(0, BOS)
    for side in (s, t):  # empty tokens (e.g. a pad, or a stripped prefix space), sometimes several in a row
        for _ in range(draw(st.integers(0, 3))):
            side.insert(draw(st.integers(0, len(side))), b"")
    return s, t


PARAMS = st.fixed_dictionaries({
    "band": st.integers(0, 6),
    "full_cells": st.sampled_from([0, 16, 1 << 20]),  # 0 / 16: force the banded DP on most segments
    "lookahead": st.integers(1, 8),
    "gram": st.integers(1, 8),
})


def assert_same(a, b):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def assert_valid(s, t, chunks, correct):
    """Chunks tile both sequences in order; correct <=> non-gap with equal concatenated bytes."""
    assert chunks.shape == (len(correct), 4) and chunks.dtype == np.int64 and correct.dtype == np.bool_
    i = j = 0
    for (s0, s1, t0, t1), ok in zip(chunks.tolist(), correct.tolist()):
        assert (s0, t0) == (i, j) and s1 >= s0 and t1 >= t0 and (s1 > s0 or t1 > t0)
        i, j = s1, t1
        same = b"".join(s[s0:s1]) == b"".join(t[t0:t1])
        assert ok == (s1 > s0 and t1 > t0 and same)
    assert (i, j) == (len(s), len(t))


# -- C++ == reference ---------------------------------------------------------------------------------------------

@settings(max_examples=400)
@given(stream_pair(edit=False), PARAMS)
def test_offsets_and_auto_match_reference_on_same_text(pair, params):
    s, t = pair
    for method in ("offsets", "auto", "dp"):
        got = _C.align_tokens(s, t, method, **params)
        assert_same(got, ref.align_tokens(s, t, method, **params))
        assert_valid(s, t, *got)
    if BOS not in s:  # identical byte streams: auto is the merge, and every non-gap chunk is correct
        chunks, correct = _C.align_tokens(s, t, "auto", **params)
        assert_same((chunks, correct), _C.align_tokens(s, t, "offsets"))
        gap = (chunks[:, 0] == chunks[:, 1]) | (chunks[:, 2] == chunks[:, 3])
        assert correct[~gap].all()


@settings(max_examples=400)
@given(stream_pair(edit=True), PARAMS)
def test_dp_and_auto_match_reference_on_edited_text(pair, params):
    s, t = pair
    for method in ("dp", "auto"):
        got = _C.align_tokens(s, t, method, **params)
        assert_same(got, ref.align_tokens(s, t, method, **params))
        assert_valid(s, t, *got)


@settings(max_examples=400)
@given(stream_pair(edit=True))
def test_raw_dp_matches_reference(pair):
    s, t = pair
    c_chunks, c_ok, c_score = _C.dp_path(s, t)
    r_chunks, r_ok, r_score = ref.dp_path(s, t)
    np.testing.assert_array_equal(c_chunks, r_chunks)
    np.testing.assert_array_equal(c_ok, r_ok)
    assert c_score == r_score


def test_long_banded_segment_matches_reference():
    """~400-token segment with no anchors (a digit table): banded DP, C++ == reference, linear-size band."""
    rng = np.random.default_rng(0)
    text = b"".join(b"%d, %d\n" % (a, b) for a, b in rng.integers(0, 10**4, size=(60, 2)))
    cuts_s = np.cumsum(rng.integers(1, 4, size=len(text)))
    cuts_t = np.cumsum(rng.integers(1, 5, size=len(text)))
    s = [text[a:b] for a, b in zip([0, *cuts_s], cuts_s) if a < len(text)]
    t = [text[a:b] for a, b in zip([0, *cuts_t], cuts_t) if a < len(text)]
    t[5:5] = [b"<x>"]  # a difference, so the streams do not merge trivially
    for params in ({"band": 4, "full_cells": 0}, {"band": 16, "full_cells": 1000}):
        got = _C.align_tokens(s, t, "dp", **params)
        assert_same(got, ref.align_tokens(s, t, "dp", **params))
        assert_valid(s, t, *got)


def test_offset_merge_matches_reference():
    rng = np.random.default_rng(1)
    for _ in range(200):
        n_bytes = int(rng.integers(0, 30))
        arrays = []
        for _side in range(2):
            ends = np.sort(rng.integers(0, n_bytes + 1, size=int(rng.integers(0, 12))))
            starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
            starts = np.where(rng.random(len(ends)) < 0.2, ends, starts)  # some zero-width tokens
            arrays += [starts, ends.astype(np.int64)]
        chunks, correct, offsets = _C.merge_offsets_batch(*([a] for a in arrays))
        r_chunks, r_correct = ref.align_offsets(*arrays)
        np.testing.assert_array_equal(chunks, r_chunks)
        np.testing.assert_array_equal(correct, r_correct)
        assert offsets.tolist() == [0, len(chunks)]


# -- oracles (METHOD.md §17) --------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", [_C.dp_path, ref.dp_path], ids=["cpp", "reference"])
@pytest.mark.parametrize("s,t,pairs,ok,score", [
    ([b"201"], [b"2", b"0", b"1"], [(0, 1, 0, 3)], [True], 4.5),                                     # O-8
    ([b" 201"], [b" ", b"2", b"0", b"1"], [(0, 1, 0, 4)], [True], 6.0),                             # O-9
    ([BOS, b"Hello", b" world", b"."], [b"Hello", b" world", b"."],                                  # O-10
     [(0, 1, 0, 0), (1, 2, 0, 1), (2, 3, 1, 2), (3, 4, 2, 3)], [False, True, True, True], 7.5),
    ([b"Hundreds"], [b"Hund", b"reds"], [(0, 1, 0, 2)], [True], 3.0),                               # O-11
    ([b"a", b"b"], [b"x", b"y"], [(0, 1, 0, 1), (1, 2, 1, 2)], [False, False], -6.0),
    ([b"ab", b"c"], [b"a", b"bc"], [(0, 1, 0, 1), (1, 2, 1, 2)], [False, False], -6.0),
    ([b"12345"], [b"1", b"2", b"3", b"4", b"5"],
     [(0, 0, 0, 1), (0, 0, 1, 2), (0, 0, 2, 3), (0, 0, 3, 4), (0, 1, 4, 5)], [False] * 5, -9.0),
])
def test_raw_dp_oracles(impl, s, t, pairs, ok, score):
    chunks, good, got_score = impl(s, t)
    assert [tuple(c) for c in chunks.tolist()] == pairs
    assert good.tolist() == ok
    assert got_score == score


@pytest.mark.parametrize("impl", [_C.align_tokens, ref.align_tokens], ids=["cpp", "reference"])
@pytest.mark.parametrize("s,t,chunks,ok", [
    ([b"ab", b"c"], [b"a", b"bc"], [(0, 2, 0, 2)], [True]),                       # O-11: 2-to-2 after post-proc.
    ([b"12345"], [b"1", b"2", b"3", b"4", b"5"], [(0, 1, 0, 5)], [True]),       # O-11: 1-to-5 (k > L)
    ([BOS, b"Hello", b" world", b"."], [b"Hello", b" world", b"."],              # O-10: BOS stays a gap
     [(0, 1, 0, 0), (1, 2, 0, 1), (2, 3, 1, 2), (3, 4, 2, 3)], [False, True, True, True]),
    ([b"Hundreds"], [b"Hund", b"reds"], [(0, 1, 0, 2)], [True]),
    ([b"a", b"b"], [b"x", b"y"], [(0, 1, 0, 1), (1, 2, 1, 2)], [False, False]),
])
@pytest.mark.parametrize("method", ["dp", "auto"])
def test_postprocessed_oracles(impl, method, s, t, chunks, ok):
    got, good = impl(s, t, method)
    assert [tuple(c) for c in got.tolist()] == chunks
    assert good.tolist() == ok


def test_bos_gap_before_a_fixable_run():
    """A run [BOS gap, ab|a, c|bc] is unequal as a whole: the BOS gap stays, the rest becomes one 2-to-2 chunk."""
    for impl in (_C.align_tokens, ref.align_tokens):
        got, good = impl([BOS, b"ab", b"c"], [b"a", b"bc"], "dp")
        assert got.tolist() == [[0, 1, 0, 0], [1, 3, 0, 2]] and good.tolist() == [False, True]


def test_anchors_split_a_long_sequence():
    """Unique 3-grams pin the path: a difference far from the ends stays local."""
    words = [b" w%d" % i for i in range(3000)]
    t = words[:1500] + [b" X"] + words[1500:]
    chunks, correct = _C.align_tokens(words, t, "dp")
    assert len(chunks) == 3001 and correct.sum() == 3000
    assert chunks[1500].tolist() == [1500, 1500, 1500, 1501]


# -- Alignment ---------------------------------------------------------------------------------------------------

def test_alignment_o10_shift_and_valid():
    """O-10: student [BOS, Hello, world, .] vs teacher [Hello, world, .]."""
    chunks, correct = _C.align_tokens([BOS, b"Hello", b" world", b"."], [b"Hello", b" world", b"."], "auto")
    a = Alignment.from_chunks([chunks], [correct], [4], [3])
    assert a.student_chunk_ids.tolist() == [[1, 2, 3, -1]]
    assert a.teacher_chunk_ids.tolist() == [[2, 3, -1]]
    assert a.chunk_valid.tolist() == [[False, False, True, True]]
    assert a.chunk_correct.tolist() == [[False, True, True, True]]
    assert a.num_chunks.tolist() == [4]
    assert a.row_spans().tolist() == [[0, 1, 2, 0, 1], [0, 2, 3, 1, 2]]
    assert Alignment.from_chunks([chunks], [correct], [4], [3], include_mismatched=True).chunk_valid.tolist() == \
        [[False, False, True, True]]


def test_alignment_batch_padding_gaps_and_mismatches():
    c0 = np.array([[0, 2, 0, 1], [2, 3, 1, 1], [3, 5, 1, 3]])  # 2-to-1, student gap, 2-to-2
    c1 = np.array([[0, 1, 0, 1], [1, 2, 1, 3]])
    a = Alignment.from_chunks([c0, c1], [[True, False, False], [True, True]], [5, 2], [3, 3], T_S=6, T_T=4)
    assert a.student_chunk_ids.tolist() == [[0, -1, 2, 2, -1, -1], [1, -1, -1, -1, -1, -1]]
    assert a.teacher_chunk_ids.tolist() == [[2, 2, -1, -1], [1, 1, -1, -1]]
    assert a.chunk_valid.tolist() == [[False, False, False], [False, True, False]]
    a2 = Alignment.from_chunks([c0, c1], [[True, False, False], [True, True]], [5, 2], [3, 3], include_mismatched=True)
    assert a2.chunk_valid.tolist() == [[False, False, True], [False, True, False]]
    assert a2.row_spans().tolist() == [[0, 2, 4, 0, 2], [1, 0, 1, 0, 2]]
    assert a2.to("cpu").chunk_valid.tolist() == a2.chunk_valid.tolist()


def test_alignment_rejects_non_partition():
    with pytest.raises(ValueError, match="partition"):
        Alignment.from_chunks([np.array([[0, 1, 0, 1], [2, 3, 1, 2]])], [[True, True]], [3], [2])
    with pytest.raises(ValueError, match="partition"):
        Alignment.from_chunks([np.array([[0, 1, 0, 1]])], [[True]], [2], [1])
    with pytest.raises(ValueError, match="T_S"):
        Alignment.from_chunks([np.array([[0, 2, 0, 1]])], [[True]], [2], [1], T_S=1)


# -- batch API ---------------------------------------------------------------------------------------------------

@given(st.lists(stream_pair(edit=True), min_size=1, max_size=6), st.sampled_from(["auto", "dp", "offsets"]))
def test_batch_ids_equals_single_and_is_thread_independent(pairs, method):
    vocab = sorted({tok for s, t in pairs for tok in s + t})
    index = {tok: i for i, tok in enumerate(vocab)}
    v = _C.Vocab(vocab)
    s_ids = [np.array([index[x] for x in s], dtype=np.int64) for s, _ in pairs]
    t_ids = [np.array([index[x] for x in t], dtype=np.int64) for _, t in pairs]
    one = _C.align_ids_batch(v, v, s_ids, t_ids, method, threads=1)
    many = _C.align_ids_batch(v, v, s_ids, t_ids, method, threads=3)
    for x, y in zip(one, many):
        np.testing.assert_array_equal(x, y)
    chunks, correct, offsets = one
    for b, (s, t) in enumerate(pairs):
        lo, hi = offsets[b], offsets[b + 1]
        assert_same((chunks[lo:hi], correct[lo:hi]), _C.align_tokens(s, t, method))


@st.composite
def long_token_pair(draw):
    """Two cuts of one text (sometimes edited) into tokens of 1..40 bytes: the id path copies and compares tokens of
    up to 16 bytes as fixed 16-byte blocks and longer ones by length, so lengths near 4, 8, 16 and 17 are edges."""
    text = draw(texts(max_size=160))
    other = draw(edited(text)) if draw(st.booleans()) else text
    return draw(split(text, max_piece=40)), draw(split(other, max_piece=40))


@given(long_token_pair(), st.sampled_from(["auto", "dp", "offsets"]))
def test_id_path_matches_reference_for_long_tokens(pair, method):
    s, t = pair
    vocab = sorted(set(s + t))
    index = {tok: i for i, tok in enumerate(vocab)}
    v = _C.Vocab(vocab)
    s_ids, t_ids = [index[x] for x in s], [index[x] for x in t]
    native = _C.IdAligner(v, v, method)
    got = native.align(s_ids, t_ids)  # plain lists: read directly by C++
    assert_same(got, ref.align_tokens(s, t, method))
    assert_same(got, native.align(np.array(s_ids, np.int64), np.array(t_ids, np.int64)))


def test_outputs_are_zero_copy_numpy():
    chunks, correct = _C.align_tokens([b"ab"], [b"a", b"b"], "auto")
    for a in (chunks, correct):
        assert not a.flags.owndata and type(a.base).__name__ == "PyCapsule" and a.flags.c_contiguous


def test_gil_is_released():
    """A Python thread keeps running while C++ aligns (it could not if the call held the GIL)."""
    import threading

    s = [b"%d" % (i % 7) for i in range(30000)]
    t = [b"%d" % (i % 5) for i in range(30000)]
    count, stop = [0], threading.Event()

    def spin():
        while not stop.is_set():
            count[0] += 1

    th = threading.Thread(target=spin)
    th.start()
    try:
        before = count[0]
        _C.align_tokens(s, t, "dp")
        during = count[0] - before
    finally:
        stop.set()
        th.join()
    assert during > 1000


def test_prefix_space_modes():
    """SentencePiece prefix space: mode 1 strips always; mode 2 strips unless the other side starts with a space."""
    v = _C.Vocab([BOS, b" Hello", b"Hello", b" world"])
    plain, spm = np.array([0, 2, 3]), np.array([1, 3])
    for mode in (1, 2):
        chunks, correct, _ = _C.align_ids_batch(v, v, [plain], [spm], "auto", 0, mode)
        assert chunks.tolist() == [[0, 1, 0, 0], [1, 2, 0, 1], [2, 3, 1, 2]] and correct.tolist() == [0, 1, 1]
    # text " Hello world": the plain side starts with a space, so a mode-2 side kept its (real) space
    chunks, correct, _ = _C.align_ids_batch(v, v, [np.array([1, 3])], [spm], "auto", 0, 2)
    assert correct.all()
    chunks, correct, _ = _C.align_ids_batch(v, v, [np.array([1, 3])], [spm], "auto", 0, 1)
    assert not correct[0]


# -- bad input ---------------------------------------------------------------------------------------------------

def test_bad_input_raises_clear_errors():
    v = _C.Vocab([b"a", b"b"])
    ok = [np.array([0, 1])]
    with pytest.raises(IndexError, match="out of range"):
        _C.align_ids_batch(v, v, [np.array([0, 2])], ok)
    with pytest.raises(IndexError, match="out of range"):
        _C.align_ids_batch(v, v, ok, [np.array([-1])])
    with pytest.raises(ValueError, match="batch sizes differ"):
        _C.align_ids_batch(v, v, ok, ok + ok)
    with pytest.raises(ValueError, match="method"):
        _C.align_ids_batch(v, v, ok, ok, "nw")
    with pytest.raises(ValueError, match="prefix"):
        _C.align_ids_batch(v, v, ok, ok, "auto", 3, 0)
    with pytest.raises(ValueError, match="1-D"):
        _C.align_ids_batch(v, v, [np.zeros((2, 2), np.int64)], ok)
    with pytest.raises(ValueError, match="non-decreasing"):
        _C.merge_offsets_batch([np.array([0, 0])], [np.array([2, 1])], [np.array([0])], [np.array([2])])
    with pytest.raises(ValueError, match="start <= end"):
        _C.merge_offsets_batch([np.array([3])], [np.array([2])], [np.array([0])], [np.array([2])])
    with pytest.raises(ValueError, match="differ in length"):
        _C.merge_offsets_batch([np.array([0, 1])], [np.array([1])], [np.array([0])], [np.array([1])])
    with pytest.raises(TypeError, match="bytes"):
        _C.align_tokens(["a"], [b"a"])
    with pytest.raises(TypeError, match="bytes"):
        _C.Vocab([b"a", 3])
    with pytest.raises(ValueError, match="band"):
        _C.align_tokens([b"a"], [b"a"], band=-1)
    # empty sequences are fine: nothing or only gaps
    assert _C.align_tokens([], [], "dp")[0].shape == (0, 4)
    assert _C.align_tokens([b"a"], [], "auto")[0].tolist() == [[0, 1, 0, 0]]


def test_extension_does_not_import_torch(tmp_path):
    import subprocess
    import sys

    # cwd outside the repository, so the installed package is imported rather than the source tree.
    code = "import sys, xtoken_ext._C; print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert run.stdout.strip() == "False", run.stderr
