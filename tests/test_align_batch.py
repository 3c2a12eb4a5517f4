"""Aligner.align_ids_batch (the threaded id batch behind the on-policy path) and Alignment's repr, on real offline
tokenizers: byte-level BPE and a byte-fallback SentencePiece side (as student and as teacher)."""
import numpy as np
import pytest
import torch

import xtoken_ext as xt
from xtoken_ext.alignment import Alignment

# Same text on both sides, then pairs whose texts differ (what a teacher sees after decoding may not be what the
# student generated), chat markup as specials, digits (byte-fallback duplicates) and non-ASCII text.
TEXTS = ["The year 2024 had 366 days; 12,345 apples cost $3.50.",
         "def area(r):\n    return 3.14159 * r ** 2  # 中文 🚀",
         "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n42<|im_end|>",
         "Ünïcödé   whitespace\n\n\tand numbers 1234567890",
         "x"]
EDITED = [("Hello  world, 7 days.", "Hello world, 7 day."), ("a b c d e f g", "a bc d e fg")]
PAIRS = [("llama3", "mistral-spm"), ("mistral-spm", "qwen3"), ("qwen3", "llama3")]
FIELDS = ("student_chunk_ids", "teacher_chunk_ids", "chunk_valid", "chunk_correct", "num_chunks", "student_lengths",
          "teacher_lengths", "chunks", "student_ids", "teacher_ids", "student_attention_mask",
          "teacher_attention_mask")


@pytest.fixture(scope="module")
def aligners(offline_tok):
    return {p: xt.Aligner(offline_tok(p[0]), offline_tok(p[1])) for p in PAIRS}


def encode(tok, text):
    return tok(text)["input_ids"] if text else []


def id_rows(al):
    """Per pair (student ids, teacher ids): shared texts, edited texts and empty sequences on either side."""
    rows = [(encode(al.student_tok, x), encode(al.teacher_tok, x)) for x in TEXTS]
    rows += [(encode(al.student_tok, a), encode(al.teacher_tok, b)) for a, b in EDITED]
    return rows + [([], []), (encode(al.student_tok, "only student"), []), ([], encode(al.teacher_tok, "teacher"))]


def one_by_one(al, S, T) -> Alignment:
    """What align_ids_batch must equal: align_ids per pair, then batched."""
    got = [al.align_ids(s, t, return_correct=True) for s, t in zip(S, T)]
    return Alignment.from_chunks([c for c, _ in got], [ok for _, ok in got], [len(s) for s in S],
                                 [len(t) for t in T], include_mismatched=al.include_mismatched, student_ids=S,
                                 teacher_ids=T)


def assert_equal(a: Alignment, b: Alignment):
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and torch.equal(x, y), f


@pytest.mark.parametrize("pair", PAIRS, ids=["-".join(p) for p in PAIRS])
def test_batch_equals_align_ids_per_pair_for_every_thread_count(aligners, pair):
    al = aligners[pair]
    S, T = zip(*id_rows(al))
    want = one_by_one(al, S, T)
    real = torch.arange(want.chunks.shape[1]) < want.num_chunks[:, None]
    gap = (want.chunks[..., 0] == want.chunks[..., 1]) | (want.chunks[..., 2] == want.chunks[..., 3])
    # the rows exercise valid chunks, gaps and incorrect chunks
    assert want.chunk_valid.sum() > 50 and (real & gap).any() and (real & ~gap & ~want.chunk_correct).any()
    for threads in (None, 0, 1, 2, 3, 64):
        assert_equal(al.align_ids_batch(list(S), list(T), threads=threads), want)


@pytest.mark.parametrize("options", [{"method": "dp"}, {"method": "offsets"}, {"include_mismatched": True}])
def test_batch_follows_the_aligner_options(aligners, options):
    base = aligners[PAIRS[0]]
    al = xt.Aligner(base.student_tok, base.teacher_tok, **options)
    S, T = zip(*id_rows(al))
    assert_equal(al.align_ids_batch(S, T, threads=2), one_by_one(al, S, T))


def test_input_forms_give_the_same_alignment(aligners):
    """Lists, numpy and torch rows; 2-D arrays with lengths (right padding) or attention masks (left padding, as
    generate() returns), on either side; every form aligns the same compacted rows."""
    al = aligners[PAIRS[0]]
    S, T = zip(*id_rows(al)[:4])
    want = al.align_ids_batch(list(S), list(T))
    W = max(map(len, S)) + 3
    right = torch.full((len(S), W), 7, dtype=torch.long)
    left = torch.full((len(S), W), 7, dtype=torch.long)
    mask = torch.zeros(len(S), W, dtype=torch.bool)
    for b, s in enumerate(S):
        right[b, :len(s)] = torch.tensor(s)
        left[b, W - len(s):] = torch.tensor(s)
        mask[b, W - len(s):] = True
    lengths = torch.tensor([len(s) for s in S])
    Tn = [np.array(t, dtype=np.int32) for t in T]
    forms = [dict(student_ids=right, student_lengths=lengths, teacher_ids=Tn),
             dict(student_ids=right.numpy(), student_lengths=lengths.tolist(),
                  teacher_ids=[torch.tensor(t) for t in T]),
             dict(student_ids=left, student_attention_mask=mask.long(), teacher_ids=T),
             dict(student_ids=left.numpy().astype(np.uint32), student_attention_mask=mask.numpy(), teacher_ids=T)]
    for kw in forms:
        assert_equal(al.align_ids_batch(**kw), want)
    # an unpadded 2-D array: every column is a token
    same = al.align_ids_batch(right[:, :3], np.asarray([t[:4] for t in T]))
    assert_equal(same, al.align_ids_batch([s[:3] for s in right.tolist()], [t[:4] for t in T]))


def test_the_alignment_owns_its_ids(aligners):
    al = aligners[PAIRS[0]]
    S, T = zip(*id_rows(al)[:2])
    W = max(map(len, S))
    ids = np.zeros((2, W), np.int64)
    for b, s in enumerate(S):
        ids[b, :len(s)] = s
    a = al.align_ids_batch(ids, list(T), student_lengths=[len(s) for s in S])
    before = a.student_ids.clone()
    ids[:] = 5
    assert torch.equal(a.student_ids, before)


def test_empty_batches_and_sequences(aligners):
    al = aligners[PAIRS[0]]
    for S, T in (([], []), (np.zeros((0, 5), np.int64), torch.zeros(0, 3, dtype=torch.long))):
        a = al.align_ids_batch(S, T)
        assert a.batch_size == 0 and a.chunks.shape == (0, 0, 4) and a.row_spans().shape == (0, 5)
    a = al.align_ids_batch([[], [], encode(al.student_tok, "ab")], [[], encode(al.teacher_tok, "ab"), []])
    assert a.num_chunks[0] == 0 and not a.chunk_valid.any()
    # one empty side: only gaps, one per token of the other side
    for b, n in ((1, int(a.teacher_lengths[1])), (2, int(a.student_lengths[2]))):
        assert int(a.num_chunks[b]) == n
    zero = al.align_ids_batch(torch.zeros(2, 4, dtype=torch.long), [[1], [1]], student_lengths=[0, 0])
    assert zero.student_lengths.tolist() == [0, 0] and zero.student_chunk_ids.shape == (2, 0)


def test_bad_input_is_rejected(aligners):
    al = aligners[PAIRS[0]]
    V = len(al.student_table.token_bytes)
    ok = [[1, 2], [3]]
    pad = torch.tensor([[1, 2], [3, 0]])
    cases = [
        (ValueError, "batch sizes differ", dict(student_ids=ok, teacher_ids=ok[:1])),
        (TypeError, "list of id sequences", dict(student_ids="hello", teacher_ids=ok)),
        (ValueError, "2-D", dict(student_ids=np.array([1, 2]), teacher_ids=ok)),
        (ValueError, "2-D", dict(student_ids=torch.zeros(2, 2, 2, dtype=torch.long), teacher_ids=ok)),
        (ValueError, r"student\[1\] ids must be 1-D", dict(student_ids=[[1], [[2]]], teacher_ids=ok)),
        (TypeError, "integers", dict(student_ids=[[1], [2.5]], teacher_ids=ok)),
        (TypeError, "integers", dict(student_ids=pad.float(), teacher_ids=ok)),
        (TypeError, "integers", dict(student_ids=pad.bool(), teacher_ids=ok)),
        (IndexError, r"teacher ids\[1\]: id 99999999 at position 0 is out of range",
         dict(student_ids=ok, teacher_ids=[[1], [99999999]])),
        (IndexError, rf"student ids\[1\]: id {V} at position 1", dict(student_ids=[[1], [3, V]], teacher_ids=ok)),
        (IndexError, "at position 0 is out of range", dict(student_ids=[[1], [-1]], teacher_ids=ok)),
        (IndexError, r"student_ids\[1\]: id 18446744073709551615 at position 0 is out of range",
         dict(student_ids=np.array([[1], [2**64 - 1]], np.uint64), teacher_ids=ok)),
        (ValueError, "not both", dict(student_ids=pad, student_lengths=[2, 1], student_attention_mask=pad > 0,
                                      teacher_ids=ok)),
        (ValueError, "need rectangular", dict(student_ids=ok, student_lengths=[2, 1], teacher_ids=ok)),
        (ValueError, "need rectangular", dict(student_ids=ok, teacher_ids=ok, teacher_attention_mask=pad > 0)),
        (ValueError, r"lie in \[0, 2\]", dict(student_ids=pad, student_lengths=[3, 1], teacher_ids=ok)),
        (ValueError, r"lie in \[0, 2\]", dict(student_ids=pad, student_lengths=[-1, 1], teacher_ids=ok)),
        (ValueError, "2 integers", dict(student_ids=pad, student_lengths=[2], teacher_ids=ok)),
        (ValueError, "2 integers", dict(student_ids=pad, student_lengths=[2.0, 1.0], teacher_ids=ok)),
        (ValueError, "must match", dict(student_ids=pad, student_attention_mask=pad[:, :1] > 0, teacher_ids=ok)),
        (TypeError, "threads", dict(student_ids=ok, teacher_ids=ok, threads=1.5)),
        (ValueError, "threads", dict(student_ids=ok, teacher_ids=ok, threads=-1)),
    ]
    for err, match, kw in cases:
        with pytest.raises(err, match=match):
            al.align_ids_batch(**kw)


def test_repr_is_short_and_counts_chunks():
    # pair 0: BOS<->BOS (no predictive row: excluded), a correct chunk (valid), an incorrect one (excluded), a gap;
    # pair 1: one valid chunk after a first chunk without predictive row, padded to K_max = 4
    chunks = [[[0, 1, 0, 1], [1, 3, 1, 2], [3, 4, 2, 4], [4, 5, 4, 4]], [[0, 1, 0, 1], [1, 2, 1, 3]]]
    correct = [[True, True, False, False], [True, True]]
    a = Alignment.from_chunks(chunks, correct, [5, 2], [4, 3], T_S=8)
    want = "Alignment(B=2, T_S=8, T_T=4, chunks=6: valid=2, excluded=3, gaps=1)"
    assert repr(a) == str(a) == want
    assert a.chunk_valid.sum() == 2  # the counts in `want` are the object's own
    assert repr(a.to("meta")) == "Alignment(B=2, T_S=8, T_T=4, K_max=4, device=meta)"


def test_repr_never_dumps_tensors(aligners):
    al = aligners[PAIRS[0]]
    S, T = zip(*id_rows(al))
    a = al.align_ids_batch(S, T)
    r = repr(a)
    assert "tensor" not in r and len(r) < 100
    gaps = sum(int(((c[:, 0] == c[:, 1]) | (c[:, 2] == c[:, 3])).sum())
               for c in (a.chunks[b, :int(a.num_chunks[b])] for b in range(a.batch_size)))
    valid = int(a.chunk_valid.sum())
    assert r == (f"Alignment(B={len(S)}, T_S={max(map(len, S))}, T_T={max(map(len, T))}, "
                 f"chunks={int(a.num_chunks.sum())}: valid={valid}, excluded={int(a.num_chunks.sum()) - gaps - valid}, "
                 f"gaps={gaps})")


def test_every_field_is_documented():
    from dataclasses import fields

    doc = Alignment.__doc__
    missing = [f.name for f in fields(Alignment) if f"``{f.name}``" not in doc]
    assert not missing and set(FIELDS) == {f.name for f in fields(Alignment)}, missing
