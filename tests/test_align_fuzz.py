"""Fuzzing the aligner (issue 12, keep-it-that-way): random bytes, real-tokenizer id streams, adversarial repeats and
one-sided runs. Every input checks the invariants (chunks tile both sides in order; correct <=> a non-gap chunk
with equal bytes, or for ids the special-token rule) and, where the pure-Python reference is defined (token bytes,
small inputs), equality with it. The budget comes from the Hypothesis profile (tests/conftest.py): "ci" by default,
HYPOTHESIS_PROFILE=thorough for a longer run. The number of inputs tried is printed at the end of the module."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_align import PARAMS, assert_same, assert_valid

import xtoken_ext as xt
from xtoken_ext import _C
from xtoken_ext.reference import align as ref

TRIED = {}
# 3x the profile's per-test budget ("ci": 300 inputs per test, about 15 s for the file on 2 cores).
FUZZ = settings(max_examples=3 * settings.default.max_examples)


class _Summary:
    """Plugin registered by the fixture below: prints the inputs tried in pytest's terminal summary."""

    def pytest_terminal_summary(self, terminalreporter):
        parts = ", ".join(f"{k} {v}" for k, v in sorted(TRIED.items()))
        terminalreporter.write_line(f"aligner fuzz: {sum(TRIED.values())} inputs tried ({parts})")


@pytest.fixture(scope="module", autouse=True)
def report_inputs_tried(request):
    request.config.pluginmanager.register(_Summary(), "xtoken-align-fuzz-summary")
    yield


def _count(name):
    TRIED[name] = TRIED.get(name, 0) + 1


def _check_against_reference(s, t, params, methods=("offsets", "auto", "dp")):
    for method in methods:
        got = _C.align_tokens(s, t, method, **params)
        assert_valid(s, t, *got)
        assert_same(got, ref.align_tokens(s, t, method, **params))


# -- random bytes ------------------------------------------------------------------------------------------------

BYTES = st.binary(max_size=6)  # any byte, 0xFF and empty tokens included


@FUZZ
@given(st.lists(BYTES, max_size=25), st.lists(BYTES, max_size=25), PARAMS)
def test_random_token_bytes(s, t, params):
    _count("random bytes")
    _check_against_reference(s, t, params)


@FUZZ
@given(st.binary(min_size=1, max_size=60), st.data(), PARAMS)
def test_random_splits_of_related_bytes(text, data, params):
    """Two splits of one random byte string, the second with a few random byte edits."""
    _count("related bytes")

    def split(b):
        cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(b) - 1)), max_size=len(b))))
        return [b[x:y] for x, y in zip([0, *cuts], [*cuts, len(b)]) if x < y] or [b]

    edited = bytearray(text)
    for _ in range(data.draw(st.integers(0, 3))):
        p = data.draw(st.integers(0, len(edited)))
        edited[p:p + data.draw(st.integers(0, 2))] = data.draw(st.binary(max_size=2))
    _check_against_reference(split(text), split(bytes(edited)), params)


# -- adversarial repeats and one-sided runs ----------------------------------------------------------------------

@FUZZ
@given(st.lists(st.binary(min_size=1, max_size=3), min_size=1, max_size=3), st.integers(1, 40),
       st.integers(0, 3), st.integers(0, 3), PARAMS)
def test_periodic_streams(unit, reps, shift, cut, params):
    """A repeated unit split at different phases (boundaries that rarely coincide), one side shifted and cut."""
    _count("periodic")
    text = b"".join(unit) * reps
    s = list(unit) * reps
    t = [text[max(0, i - shift):i + 2] for i in range(0, len(text), 2) if text[max(0, i - shift):i + 2]]
    _check_against_reference(s, t[:len(t) - cut] if cut else t, params)


@FUZZ
@given(st.integers(0, 3000), st.binary(max_size=4), st.binary(max_size=4), st.booleans())
def test_one_sided_runs(n, tok, other, student_long):
    """n copies of one token against <= 1 token (a truncated side): chunks tile, nothing unequal is correct."""
    _count("one-sided")
    long, short = [tok] * n, [other] if other else []
    s, t = (long, short) if student_long else (short, long)
    for method in ("offsets", "auto", "dp"):
        assert_valid(s, t, *_C.align_tokens(s, t, method))
    if n <= 40:
        _check_against_reference(s, t, {"band": 64, "full_cells": 1 << 16, "lookahead": 64, "gram": 16})


# -- real-tokenizer id streams -----------------------------------------------------------------------------------

PAIRS = [("llama3", "qwen3"), ("mistral-spm", "llama3")]
MARKUP = ["<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<s>", "</s>", "<|begin_of_text|>"]


@pytest.fixture(scope="module")
def aligners(offline_tok):
    return [xt.Aligner(offline_tok(a), offline_tok(b)) for a, b in PAIRS]


def _check_ids(al, s_ids, t_ids, chunks, correct):
    """Tiling; a correct chunk holds equal canonical text and no special, or is a 1:1 pair of specials. Only the
    first text chunk may differ by the SentencePiece prefix space of a side with a prefix mode."""
    vs, vt = al.student_table.token_bytes, al.teacher_table.token_bytes
    s_sp, t_sp = al.student_table.roles != 0, al.teacher_table.roles != 0
    i = j = 0
    first_text = True
    for (s0, s1, t0, t1), ok in zip(chunks.tolist(), correct.tolist()):
        assert (s0, t0) == (i, j) and s1 >= s0 and t1 >= t0 and (s1 > s0 or t1 > t0)
        i, j = s1, t1
        if not ok:
            continue
        assert s1 > s0 and t1 > t0
        if s_sp[s_ids[s0:s1]].any() or t_sp[t_ids[t0:t1]].any():
            assert s1 - s0 == 1 and t1 - t0 == 1 and s_sp[s_ids[s0]] and t_sp[t_ids[t0]]
            continue
        a, b = b"".join(vs[x] for x in s_ids[s0:s1]), b"".join(vt[x] for x in t_ids[t0:t1])
        if first_text:
            a, b = (x[1:] if mode and x.startswith(b" ") and not y.startswith(b" ") else x
                    for x, y, mode in ((a, b, al._prefix[0]), (b, a, al._prefix[1])))
            first_text = False
        assert a == b, (a, b)
    assert (i, j) == (len(s_ids), len(t_ids))


@FUZZ
@given(st.data(), st.lists(st.one_of(st.text(max_size=12), st.sampled_from(MARKUP)), min_size=1, max_size=8),
       st.sampled_from(range(len(PAIRS))), st.sampled_from(["auto", "dp"]))
def test_real_tokenizer_id_streams(aligners, data, pieces, pair, method):
    """Random text with chat markup strings, tokenized with special-token parsing by two real tokenizers, sometimes
    truncated on one side; align_ids invariants, and align_tokens == reference on the canonical token bytes."""
    _count("real ids")
    al = aligners[pair]
    text = "".join(pieces)
    s_ids = np.asarray(al.student_tok(text)["input_ids"], np.int64)
    t_ids = np.asarray(al.teacher_tok(text)["input_ids"], np.int64)
    t_ids = t_ids[:data.draw(st.integers(0, len(t_ids)))] if data.draw(st.booleans()) else t_ids
    al.method = method
    _check_ids(al, s_ids, t_ids, *al.align_ids(s_ids, t_ids, return_correct=True))
    if len(s_ids) + len(t_ids) <= 80:
        s = [al.student_table.token_bytes[x] for x in s_ids]
        t = [al.teacher_table.token_bytes[x] for x in t_ids]
        _check_against_reference(s, t, {"band": 8, "full_cells": 64, "lookahead": 16, "gram": 8}, ("auto", "dp"))
