"""Aligner hardening (issue 12): racing writers, one-sided and periodic inputs that used to take quadratic time,
special tokens against text, thread start failures, pickling / DataLoader workers, and clear errors for bad
parameters, ids and hand-built Alignments."""
import os
import pickle
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest
import torch
from test_align import assert_same, assert_valid

import xtoken_ext as xt
from xtoken_ext import _C
from xtoken_ext.alignment import Alignment
from xtoken_ext.reference import align as ref


def _run(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """A fresh interpreter (a crash there fails the test instead of killing the session)."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    # cwd outside the checkout: import the installed package (a plain source tree has no built _C)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False, cwd=tempfile.gettempdir())


# -- 1. TOCTOU: ids are copied before they are checked -----------------------------------------------------------

def test_ids_rewritten_by_another_thread_never_crash():
    """A thread flips the ids between valid and out of range while align_ids_batch runs with the GIL released;
    before, the checked buffer was read again after the check (SIGSEGV in Vocab::sequence)."""
    run = _run("""
        import threading, numpy as np
        from xtoken_ext import _C
        v = _C.Vocab([b"a", b"b", b"ab"])
        ids = np.zeros(400_000, np.int64)
        stop = threading.Event()
        def flip():
            while not stop.is_set():
                ids[::7] = 10**12
                ids[::7] = 1
        th = threading.Thread(target=flip)
        th.start()
        ok = bad = 0
        for _ in range(60):
            try:
                _C.align_ids_batch(v, v, [ids], [ids[:1000]], "offsets", threads=1)
                ok += 1
            except IndexError as e:
                assert "out of range" in str(e)
                bad += 1
        stop.set(); th.join()
        print(ok, bad)
    """)
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
    ok, bad = map(int, run.stdout.split())
    assert ok + bad == 60


# -- 2. work bounded by the input size ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", [200_000, 3_000_000])
@pytest.mark.parametrize("method", ["auto", "dp"])
def test_one_sided_run_is_linear(n, method):
    """n student tokens against one teacher token (a truncated side): one chunk per student token. Was quadratic in
    the post-processing (100k: 2 s, 3M: > 300 s); the time bound is only a hang guard."""
    v = _C.Vocab([b" the", b"x"])
    t0 = time.perf_counter()
    chunks, correct, _ = _C.align_ids_batch(v, v, [np.zeros(n, np.int64)], [np.ones(1, np.int64)], method)
    assert time.perf_counter() - t0 < 5
    assert len(chunks) == n and not correct.any()
    assert chunks[-1].tolist() == [n - 1, n, 0, 1] and (chunks[:-1, 3] == 0).all()


def test_periodic_text_with_no_common_boundary_is_linear():
    """Same periodic text, boundaries never coincide, last byte differs: auto used to resync one token further
    and re-walk the whole rest each time (20k tokens: 1 s, 200k: minutes). Small sizes == reference."""
    def pair(n):
        return [b"ab"] * n + [b"c"], [b"a"] + [b"ba"] * (n - 1) + [b"bd"]

    for n in (3, 20, 60):
        s, t = pair(n)
        for method in ("auto", "dp"):
            got = _C.align_tokens(s, t, method)
            assert_same(got, ref.align_tokens(s, t, method))
            assert_valid(s, t, *got)
    s, t = pair(200_000)
    t0 = time.perf_counter()
    chunks, correct = _C.align_tokens(s, t, "auto")
    assert time.perf_counter() - t0 < 5
    assert_valid(s, t, chunks, correct)
    assert not correct.any()


def test_long_equal_run_suffix_is_still_found():
    """Post-processing step 1 (now O(1) per pair from a per-run common suffix): a run whose suffix is equal after
    a leading unequal pair still becomes one correct chunk; C++ == reference."""
    s = [b"X", b"ab", b"c"] + [b"de", b"f"] * 50
    t = [b"Y", b"a", b"bc"] + [b"d", b"ef"] * 50
    for method in ("dp", "auto"):
        got = _C.align_tokens(s, t, method)
        assert_same(got, ref.align_tokens(s, t, method))
        assert_valid(s, t, *got)
        assert got[1].sum() >= 1


# -- 3. special tokens are never equal to text (align / align_batch / align_ids agree) ---------------------------

def test_special_token_from_text_is_not_equal_to_text_pieces(offline_tok):
    s_tok, t_tok = offline_tok("llama3"), offline_tok("qwen3")
    al = xt.Aligner(s_tok, t_tok)
    text = "Hello.<|end_of_text|> world"
    s_ids, t_ids = s_tok(text)["input_ids"], t_tok(text)["input_ids"]
    eos = s_ids.index(s_tok.eos_token_id)
    for chunks, correct in (al.align(text, return_correct=True), al.align_ids(s_ids, t_ids, return_correct=True)):
        (k,) = [k for k, c in enumerate(chunks.tolist()) if c[0] <= eos < c[1]]
        assert not correct[k]
        ok = [c for c, good in zip(chunks.tolist(), correct.tolist()) if good]
        assert all(s_tok.decode(s_ids[a:b]) == t_tok.decode(t_ids[c:d]) for a, b, c, d in ok)
    batch = al.align_batch([text])
    assert not batch.chunk_correct[0, k] and not batch.chunk_valid[0, k]
    c_off = al.align(text, return_correct=True)
    c_ids = al.align_ids(s_ids, t_ids, return_correct=True)
    assert {tuple(c) for c, g in zip(c_off[0].tolist(), c_off[1]) if g} == \
        {tuple(c) for c, g in zip(c_ids[0].tolist(), c_ids[1]) if g}


def test_special_rule_on_a_hand_made_vocab():
    """Role bits pair specials 1:1 (BOS|BOS, EOS|end of turn); <unk> never; same literal text yes; a special
    against its own literal text as a text token never."""
    toks = [b"<s>", b"<|begin|>", b"</s>", b"<|im_end|>", b"<unk>", b"<|x|>", b"<|x|>", b"hi"]
    special = [3, 3, 13, 9, 17, 1, 0, 0]  # kSpecial=1, bos=2, eos=4, eot=8, unk=16; id 6 is text "<|x|>"
    v = _C.Vocab(toks, special)
    for s, t, want in [(0, 1, True), (2, 3, True), (0, 3, False), (4, 4, False), (5, 5, True), (5, 6, False),
                       (6, 6, True)]:
        for method in ("auto", "dp"):
            chunks, correct, _ = _C.align_ids_batch(v, v, [[7, s, 7]], [[7, t, 7]], method)
            assert chunks.tolist() == [[0, 1, 0, 1], [1, 2, 1, 2], [2, 3, 2, 3]], (s, t, method)
            assert correct.tolist() == [True, want, True], (s, t, method)
    with pytest.raises(ValueError, match="special"):
        _C.Vocab(toks, [2] * len(toks))  # role bits without kSpecial
    with pytest.raises(ValueError, match="one per token"):
        _C.Vocab(toks, [0])


# -- 4. thread start failure is an exception, not std::terminate -------------------------------------------------

@pytest.mark.skipif(bool(os.environ.get("XTOKEN_SANITIZED")),
                    reason="ASan reserves terabytes of address space: an RLIMIT_AS cannot target thread stacks")
def test_thread_start_failure_raises():
    """Address space for only a few thread stacks: the started threads are joined and a RuntimeError says so
    (before: std::terminate, the process aborted)."""
    run = _run("""
        import resource, numpy as np
        from xtoken_ext import _C
        v = _C.Vocab([b"a", b"b"])
        ids = [np.array([0, 1], np.int64)] * 64
        size = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize")) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size + 40 * 2**20, resource.RLIM_INFINITY))
        try:
            _C.align_ids_batch(v, v, ids, ids, threads=64)
            print("no failure")
        except RuntimeError as e:
            print(e)
    """)
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
    assert "could not start thread" in run.stdout, run.stdout


def test_huge_thread_counts_are_capped():
    v = _C.Vocab([b"a", b"b"])
    ids = [np.array([0, 1], np.int64)] * 3000
    one = _C.align_ids_batch(v, v, ids, ids, threads=1)
    many = _C.align_ids_batch(v, v, ids, ids, threads=10**9)
    for x, y in zip(one, many):
        np.testing.assert_array_equal(x, y)


# -- 5. pickling and DataLoader workers --------------------------------------------------------------------------

TEXTS = ["Hello world.", "Prices: 1234567, 3.14", "def f(x):\n    return x", "café naïve"]


@pytest.fixture(scope="module")
def aligner(offline_tok):
    return xt.Aligner(offline_tok("llama3"), offline_tok("qwen3"))


def test_vocab_aligner_and_alignment_pickle(aligner):
    v = _C.Vocab([b"a", b"<|x|>"], [0, 1])
    v2 = pickle.loads(pickle.dumps(v))
    assert len(v2) == 2
    assert_same(_C.align_ids_batch(v, v, [[0, 1]], [[1, 0]])[:2], _C.align_ids_batch(v2, v2, [[0, 1]], [[1, 0]])[:2])
    al2 = pickle.loads(pickle.dumps(aligner))
    for text in TEXTS:
        assert_same(aligner.align(text, return_correct=True), al2.align(text, return_correct=True))
    a = aligner.align_batch(TEXTS)
    b = pickle.loads(pickle.dumps(a))
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("chunks", "chunk_valid", "student_chunk_ids"))


def test_alignment_equality_is_identity(aligner):
    """`==` on Alignments neither raises (tensor fields) nor compares contents; they stay hashable."""
    a = aligner.align_batch(TEXTS)
    b = pickle.loads(pickle.dumps(a))
    assert a == a and a != b and len({a, b}) == 2


def test_aligner_state_pickled_with_plain_method_attribute(aligner):
    """An Aligner pickled before `method` became a property (its state has "method", not "_method") still loads."""
    state = aligner.__getstate__()
    old = {("method" if k == "_method" else k): v for k, v in state.items()}
    al2 = xt.Aligner.__new__(xt.Aligner)
    al2.__setstate__(old)
    assert al2.method == aligner.method and "method" not in vars(al2)
    for text in TEXTS:
        assert_same(aligner.align(text, return_correct=True), al2.align(text, return_correct=True))


class _Collate:
    def __init__(self, aligner):
        self.aligner = aligner

    def __call__(self, texts):
        return self.aligner.align_batch(texts)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers(aligner, context):
    want = [aligner.align_batch(TEXTS[i:i + 2]) for i in (0, 2)]
    loader = torch.utils.data.DataLoader(TEXTS, batch_size=2, num_workers=2, collate_fn=_Collate(aligner),
                                         multiprocessing_context=context)
    got = list(loader)
    assert len(got) == 2
    for a, b in zip(got, want):
        for f in ("chunks", "chunk_correct", "chunk_valid", "student_chunk_ids", "teacher_chunk_ids"):
            assert torch.equal(getattr(a, f), getattr(b, f)), f


# -- 6. clear errors ---------------------------------------------------------------------------------------------

def test_parameters_are_validated_at_construction(aligner):
    s, t = aligner.student_tok, aligner.teacher_tok
    for kw, err in [({"band": "64"}, TypeError), ({"band": 64.0}, TypeError), ({"lookahead": True}, TypeError),
                    ({"band": -1}, ValueError), ({"band": 2**40}, ValueError), ({"lookahead": 2**63}, ValueError),
                    ({"gram": 0}, ValueError), ({"full_cells": None}, TypeError)]:
        with pytest.raises(err, match=next(iter(kw))):
            xt.Aligner(s, t, **kw)
    with pytest.raises(TypeError, match="threads"):
        aligner.align_batch(["a"], threads=1.5)
    with pytest.raises(TypeError, match="max_length"):
        aligner.align_batch(["a"], max_length="5")
    for kw in ({"band": 2**40}, {"lookahead": 2**31}, {"gram": 2**62}):
        with pytest.raises(ValueError, match="band"):
            _C.align_tokens([b"a"], [b"a"], **kw)


def test_uint64_ids_are_reported_with_their_value(aligner):
    big = np.array([5, 2**63 + 7], dtype=np.uint64)
    with pytest.raises(IndexError, match="9223372036854775815 at position 1"):
        aligner.align_ids(big, [5])
    v = _C.Vocab([b"a", b"b"])
    with pytest.raises(IndexError, match="18446744073709551615 at position 0"):
        _C.align_ids_batch(v, v, [np.array([2**64 - 1], np.uint64)], [[0]])
    with pytest.raises(TypeError, match="integers"):
        _C.align_ids_batch(v, v, [np.array([0.5])], [[0]])
    assert _C.align_ids_batch(v, v, [np.array([1, 0], np.uint64)], [np.array([1, 0], np.uint32)])[1].all()


def test_hand_built_alignment_with_bad_chunks_is_rejected():
    good = Alignment.from_chunks([np.array([[0, 2, 0, 2], [2, 4, 2, 4]])], [[True, True]], [4], [4])
    assert good.chunk_valid.tolist() == [[True, True]]
    fields = {f: getattr(good, f) for f in good.__dataclass_fields__}
    for bad in ([[0, 3, 0, 2], [2, 4, 2, 4]],     # overlapping
                [[-1, 2, 0, 2], [2, 4, 2, 4]],    # negative
                [[0, 2, 0, 2], [2, 6, 2, 4]]):    # past the sequence
        with pytest.raises(ValueError, match="valid chunk"):
            Alignment(**{**fields, "chunks": torch.tensor([bad])})
    with pytest.raises(ValueError, match="partition"):
        Alignment.from_chunks([np.array([[0, 2, 0, 2], [1, 3, 1, 3]])], [[True, True]], [3], [3])


def test_offsets_method_on_ids_takes_template_specials_as_zero_width(aligner, offline_tok):
    """method="offsets" on ids: Llama-3's BOS (on the student side only) counted its 17 literal bytes, every later
    byte end of the student side was shifted and no chunk was correct. A leading BOS / trailing EOS run is
    zero-width there, as in the text path's offsets, so ids and text give the same chunks; a special inside the
    text keeps its literal bytes, so the other side's text pieces of it stay in sync (GPT-2's <|endoftext|>
    against Mistral's pieces: all made zero-width, 2 chunks of 11 stayed correct)."""
    cases = [(aligner.student_tok, aligner.teacher_tok, ["Hello world, this is a test.", "Another one, 12345."]),
             (aligner.teacher_tok, aligner.student_tok, ["Hello world, this is a test."]),
             (offline_tok("gpt2"), offline_tok("mistral-spm"),
              ["Hello world.<|endoftext|> More text here, and some more words."])]
    for s, t, texts in cases:
        al = xt.Aligner(s, t, method="offsets")
        got = al.align_ids_batch([s(x)["input_ids"] for x in texts], [t(x)["input_ids"] for x in texts])
        want = al.align_batch(texts)
        for f in ("chunks", "chunk_valid", "chunk_correct", "num_chunks"):
            assert torch.equal(getattr(got, f), getattr(want, f)), f
        assert int(got.chunk_correct.sum()) >= 8


def test_flags_threads_and_padded_lists_are_checked(aligner):
    """include_mismatched=2 acted as False (2 & flags == 0) and None failed at align time; threads >= 2**63 reached
    pybind11 raw; full_cells >= 2**63 too; a tokenizer's padded output (a rectangular list) with its attention mask
    was refused as ragged."""
    s, t = aligner.student_tok, aligner.teacher_tok
    for bad in (2, None, "yes"):
        with pytest.raises(TypeError, match="include_mismatched must be a bool"):
            xt.Aligner(s, t, include_mismatched=bad)
        with pytest.raises(TypeError, match="include_mismatched must be a bool"):
            Alignment.from_chunks([[[0, 1, 0, 1]]], [[True]], [1], [1], include_mismatched=bad)
    with pytest.raises(ValueError, match="full_cells"):
        xt.Aligner(s, t, full_cells=2**63)
    want, text = aligner.align_ids_batch([[1, 2]], [[1, 2]], threads=1), aligner.align_batch(["hi"], threads=1)
    for threads in (2**63, 2**70, np.uint64(5)):
        assert torch.equal(aligner.align_ids_batch([[1, 2]], [[1, 2]], threads=threads).chunks, want.chunks)
        assert torch.equal(aligner.align_batch(["hi"], threads=threads).chunks, text.chunks)
    texts = ["Hello world", "hi"]
    s.pad_token = s.eos_token
    try:
        enc = s(texts, padding=True)
    finally:
        s.pad_token = None
    assert isinstance(enc["input_ids"], list)
    t_rows = [t(x)["input_ids"] for x in texts]
    got = aligner.align_ids_batch(enc["input_ids"], t_rows, student_attention_mask=enc["attention_mask"])
    assert torch.equal(got.chunks, aligner.align_ids_batch([s(x)["input_ids"] for x in texts], t_rows).chunks)
    with pytest.raises(ValueError, match="rectangular student_ids"):
        aligner.align_ids_batch([[1, 2], [3]], [[1], [2]], student_attention_mask=[[1, 1], [1, 0]])


def test_alignment_fields_and_from_chunks_inputs_are_typed():
    """An int64 chunk_valid indexed the chunks instead of masking them (a shape error deep in a loss); numpy fields
    failed on .device; from_chunks truncated 1.7 to 1, 2.9-token lengths to 2, T_S=3.5 to 3, and took "no" as
    True."""
    good = Alignment.from_chunks([[[0, 1, 0, 1], [1, 3, 1, 2]]], [[1, 0]], [3], [2], T_S=4)
    assert good.chunk_correct.tolist() == [[True, False]]
    fields = {f: getattr(good, f) for f in good.__dataclass_fields__}
    for name, value, msg in (("chunk_valid", good.chunk_valid.long(), "chunk_valid must be a bool tensor"),
                             ("chunks", good.chunks.float(), "chunks must be an integer tensor"),
                             ("num_chunks", good.num_chunks.numpy(), "num_chunks must be a torch tensor"),
                             ("student_attention_mask", torch.ones(1, 4, dtype=torch.long), "must be a bool")):
        with pytest.raises(TypeError, match=msg):
            Alignment(**{**fields, name: value})
    meta = {k: v.to("meta") for k, v in fields.items() if v is not None}
    with pytest.raises(TypeError, match="chunk_valid must be a bool"):  # checked on any device
        Alignment(**{**meta, "chunk_valid": meta["chunk_valid"].long()})
    for args, kw, msg in ((([[[0, 1.7, 0, 1], [1.7, 3, 1, 2]]], [[1, 1]], [3], [2]), {}, "chunks_list\\[0\\]"),
                          (([[[0, 2, 0, 1]]], [[1]], [2.9], [1]), {}, "student_lengths"),
                          (([[[0, 2, 0, 1]]], [[1]], [2], [1]), {"T_S": 3.5}, "T_S"),
                          (([[[0, 2, 0, 1]]], [["no"]], [2], [1]), {}, "correct_list\\[0\\]"),
                          (([[[0, 2, 0, 1]]], [[2]], [2], [1]), {}, "correct_list\\[0\\]")):
        with pytest.raises(TypeError, match=msg):
            Alignment.from_chunks(*args, **kw)
    with pytest.raises(ValueError, match="teacher_lengths must be >= 0, got -1"):  # numpy's "negative dimensions"
        Alignment.from_chunks([[]], [[]], [0], [-1])


def test_native_vocabulary_cache_keys_the_specials_texts(offline_tok):
    """Two tokenizers whose end-of-turn tokens differ only in text ("<|im_end|>", "<end_of_turn>") have one
    fingerprint (a role marker stands for the text): the native vocabulary cached for the first served the second,
    whose 13-byte special was read as 10 bytes, and its chunk against the teacher's text pieces broke into gaps."""
    import copy

    from xtoken_ext.tokenizers import token_table

    im, eot = copy.deepcopy(offline_tok("gpt2")), copy.deepcopy(offline_tok("gpt2"))
    im.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    eot.add_special_tokens({"additional_special_tokens": ["<end_of_turn>"]})
    assert token_table(im).fingerprint == token_table(eot).fingerprint
    t = offline_tok("qwen3")
    text = "hi there<end_of_turn>and more words"
    s_ids, t_ids = eot(text, add_special_tokens=False)["input_ids"], t(text, add_special_tokens=False)["input_ids"]
    assert s_ids[2] == len(offline_tok("gpt2")) and len(t_ids) == len(s_ids) + 4  # "<end_of_turn>": 5 teacher pieces
    xt.Aligner(im, t)
    chunks, correct = xt.Aligner(eot, t).align_ids(s_ids, t_ids, return_correct=True)
    assert chunks.tolist() == [[0, 1, 0, 1], [1, 2, 1, 2], [2, 3, 2, 7], [3, 4, 7, 8], [4, 5, 8, 9], [5, 6, 9, 10]]
    assert correct.tolist() == [True, True, False, True, True, True]  # a special is never equal to text


def test_tokens_added_after_the_aligner_was_made_are_named(offline_tok):
    """A tokenizer that grew after its Aligner was made gave "id 50257 ... is out of range for a vocabulary of
    50257", which reads like a bug of the aligner."""
    import copy

    s, t = copy.deepcopy(offline_tok("gpt2")), offline_tok("qwen3")
    aligner = xt.Aligner(s, t)
    s.add_tokens(["zzqq"])
    hint = r"out of range .*\(the student tokenizer has 50258 ids now, 50257 when this Aligner was made: make a new"
    for call in (lambda: aligner.align("hi zzqq"), lambda: aligner.align_batch(["hi", "hi zzqq"]),
                 lambda: aligner.align_ids([50257], [6023]), lambda: aligner.align_ids_batch([[50257]], [[6023]])):
        with pytest.raises(IndexError, match=hint):
            call()
    assert xt.Aligner(s, t).align("hi zzqq").tolist() == [[0, 1, 0, 1], [1, 3, 1, 3]]
    with pytest.raises(IndexError, match=r"out of range for a vocabulary of 50258$"):  # no hint: nothing grew
        xt.Aligner(s, t).align_ids([50258], [6023])
