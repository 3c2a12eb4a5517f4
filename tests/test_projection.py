"""Projection W without real tokenizers: METHOD.md oracles O-1, O-4, O-5, O-16, the ELL builder against a
dict reference (Hypothesis), common sets with alias / exact row masks, and the file format (round trip, corruption,
validation, version 1 files)."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from xtoken_ext.projection import FORMAT_VERSION, Projection, ProjectionFileError, _ell

O1 = {1: [1.0], 2: [0.909091, 0.090909], 3: [0.900901, 0.090090, 0.009009],
      4: [0.900090, 0.090009, 0.009001, 0.000900]}


def _decay_entries(n_pieces, beta=0.9, gamma=0.1):
    """One student row (id 0) re-tokenized into teacher ids 10, 11, ...: the builder's β·γ^i entries."""
    s = np.zeros(n_pieces, dtype=np.int64)
    t = np.arange(10, 10 + n_pieces, dtype=np.int64)
    return s, t, beta * gamma ** np.arange(n_pieces, dtype=np.float64)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("beta", [0.9, 1.0, 0.01, 37.0])
def test_o1_decay_weights_beta_invariant(n, beta):
    indices, weights = _ell(*_decay_entries(n, beta=beta), 1)
    assert indices[0, :n].tolist() == list(range(10, 10 + n)) and (indices[0, n:] == -1).all()
    np.testing.assert_allclose(weights[0, :n], O1[n], atol=5e-7)


def test_o2_repeated_ids_accumulate():
    # "000" -> ["0", "0", "0"]: every piece is teacher id 7, weights add up to 1.
    indices, weights = _ell(np.zeros(3, np.int64), np.full(3, 7), 0.9 * 0.1 ** np.arange(3.0), 1)
    assert indices[0].tolist() == [7, -1, -1, -1] and weights[0].tolist() == [1.0, 0, 0, 0]
    # "202" -> ["2", "0", "2"]: 0.900901 + 0.009009 on "2", 0.090090 on "0".
    indices, weights = _ell(np.zeros(3, np.int64), np.array([2, 0, 2]), 0.1 ** np.arange(3.0), 1)
    assert indices[0, :2].tolist() == [2, 0]
    np.testing.assert_allclose(weights[0, :2], [0.909910, 0.090090], atol=5e-7)


def test_o4_exact_row_is_strict_common():
    P = Projection([[5, -1, -1, -1], [6, 7, -1, -1]], [[1, 0, 0, 0], [0.909091, 0.090909, 0, 0]], 8)
    s, t = P.common_pairs("strict")
    assert s.tolist() == [0] and t.tolist() == [5]


def test_alias_rows_never_common_and_exact_rows_win_ties():
    # Rows 0 (<0x30>, alias) and 2 ("0", emitted) both map exactly onto teacher 5; row 1 ("000" -> ["0","0","0"])
    # is one-hot on teacher 5 too, but no string match; row 3 is a lone alias (its emitted twin is elsewhere).
    idx = [[5, -1, -1, -1], [5, -1, -1, -1], [5, -1, -1, -1], [6, -1, -1, -1]]
    w = [[1, 0, 0, 0]] * 4
    P = Projection(idx, w, 8, alias_rows=[True, False, False, True], exact_rows=[True, False, True, True])
    for mode in ("strict", "relaxed"):
        s, t = P.common_pairs(mode)
        assert list(zip(s.tolist(), t.tolist())) == [(2, 5)], mode
    # Without the masks (hand-built W): the release rule, lowest student id.
    s, t = Projection(idx, w, 8).common_pairs("strict")
    assert list(zip(s.tolist(), t.tolist())) == [(0, 5), (3, 6)]
    with pytest.raises(ValueError, match=r"alias_rows must be bool \[4\]"):
        Projection(idx, w, 8, alias_rows=[True])
    # stats' H-KL candidates (top-1 >= 0.6) counted the alias rows too, which never enter a common set
    assert P.stats().relaxed == 2 and Projection(idx, w, 8).stats().relaxed == 4


ONE = [[1, -1, -1, -1]]


@pytest.mark.parametrize("args, exc, msg", [
    (([[2 ** 32 + 3, -1, -1, -1]], [[1.0, 0, 0, 0]], 10), ValueError, r"teacher indices must lie in \[-1, 10\)"),
    ((torch.tensor([[2.7, -1, -1, -1]]), [[1.0, 0, 0, 0]], 10), TypeError, "indices must hold integers"),
    ((torch.ones(1, 4, dtype=torch.bool), [[1.0, 0, 0, 0]], 10), TypeError, "indices must hold integers"),
    ((ONE, [[1.0, 0, 0, 0]], 5.5), TypeError, "teacher_vocab_size must be an int"),
    ((ONE, [[1.0, 0, 0, 0]], True), TypeError, "teacher_vocab_size must be an int"),
    ((ONE, [[1.0, 0, 0, 0]], 2 ** 31), ValueError, "teacher_vocab_size must be in"),
    ((ONE, [[0.5, 0, 0, 0]], 3), ValueError, r"rows must sum to 1 \(or be empty\): 1 rows .* row 0: 0.5"),
    ((ONE, [[0.0, 0, 0, 0]], 3), ValueError, "rows must sum to 1"),
    (([[1, 2, -1, -1]], [[1.0, 1.0, 0, 0]], 3), ValueError, "rows must sum to 1"),
    (([[0, -1, -1, -1], [2, 1, 2, -1]], [[1.0, 0, 0, 0], [0.5, 0.25, 0.25, 0]], 3), ValueError,
     r"1 rows repeat a teacher id .* row 1: \[2, 1, 2, -1\]"),
])
def test_bad_w_is_rejected_where_it_is_built(args, exc, msg):
    """What Projection.load refuses, the constructor refuses too (a saved W always loads), ids are range-checked
    before they are narrowed to int32 (2^32 + 3 wrapped to 3), and a row holds each teacher id once (stats() and
    common_pairs() counted {1: .5, 1: .5} as two ids and not as relaxed-common)."""
    with pytest.raises(exc, match=msg):
        Projection(*args)


def test_random_w_checks_its_arguments():
    """Sizes, max_pieces and seed by type and range, empty_rows as a fraction (5.5 or -1 raised torch errors,
    max_pieces=2.5 passed into torch.randint, empty_rows=2.0 made every row empty)."""
    for kw, exc, msg in ((dict(student_vocab_size=5.5), TypeError, "student_vocab_size must be an int"),
                         (dict(student_vocab_size=-1), ValueError, "student_vocab_size must be in"),
                         (dict(max_pieces=2.5), TypeError, "max_pieces must be an int"),
                         (dict(teacher_vocab_size=2), ValueError, "teacher_vocab_size must be in \\[4,"),
                         (dict(empty_rows=2.0), ValueError, "empty_rows must be a fraction"),
                         (dict(seed=-1), ValueError, "seed must be in"),
                         (dict(seed=2**70), ValueError, "seed must be in"),  # torch: "Overflow when unpacking"
                         (dict(gamma=True), TypeError, "gamma must be a real number"),  # passed as 1.0
                         (dict(gamma="x"), TypeError, "gamma must be a real number")):
        args = dict(student_vocab_size=5, teacher_vocab_size=10) | kw
        with pytest.raises(exc, match=msg):
            Projection.random(args.pop("student_vocab_size"), args.pop("teacher_vocab_size"), **args)


@pytest.mark.parametrize("V_T", [1, 2, 3])
def test_random_w_with_fewer_teacher_ids_than_slots(V_T, tmp_path):
    """Every slot was redrawn until distinct, so V_T < 4 never returned (run in a child with a deadline first, so
    that a regression fails instead of hanging the suite; outside the checkout, whose source folder has no built
    extension)."""
    code = f"from xtoken_ext.projection import Projection; Projection.random(50, {V_T}, max_pieces={V_T}, seed=1)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=tmp_path)
    P = Projection.random(50, V_T, max_pieces=V_T, seed=1)
    for s in range(50):
        row = P.row(s)
        assert 1 <= len(row) <= V_T and math.isclose(sum(row.values()), 1.0, rel_tol=1e-6)
    assert max(len(P.row(s)) for s in range(50)) == V_T


@pytest.mark.parametrize("gamma", [0.0, 2.0, -0.5])
def test_random_w_checks_gamma_as_from_tokenizers(gamma):
    with pytest.raises(ValueError, match=r"gamma must be in \(0, 1\]"):
        Projection.random(5, 4, gamma=gamma)


def test_audit_checks_examples_and_a_learnable_w_refuses_a_learnable_w():
    """audit(examples=-1) listed every token outside the exact set but one, 1.5 raised a slice error; a
    LearnableProjection of a LearnableProjection was built and failed at .projection() (no attribute 'meta')."""
    from xtoken_ext.losses import LearnableProjection

    P = Projection([[5, -1, -1, -1]], [[1, 0, 0, 0]], 8)
    for bad, exc in ((-1, ValueError), (1.5, TypeError)):
        with pytest.raises(exc, match="examples must be"):
            P.audit(examples=bad)
    with pytest.raises(TypeError, match=r"needs an xt.Projection, got LearnableProjection \(use its .projection\(\)\)"):
        LearnableProjection(LearnableProjection(P))
    assert LearnableProjection(LearnableProjection(P).projection()).projection().row(0) == {5: 1.0}


def test_learned_w_keeps_the_row_masks(tmp_path):
    """LearnableProjection learns weights on W's fixed support, so its frozen copy keeps exact_rows / alias_rows (the
    strict common set must not widen when a learned W is saved) and saves and loads."""
    from xtoken_ext.losses import LearnableProjection

    idx, w = [[5, -1, -1, -1], [5, -1, -1, -1], [6, 7, -1, -1]], [[1, 0, 0, 0], [1, 0, 0, 0], [0.6, 0.4, 0, 0]]
    base = Projection(idx, w, 8, exact_rows=[False, True, False], alias_rows=[True, False, False])
    lp = LearnableProjection(base)
    with torch.no_grad():
        lp.theta += torch.tensor([[0.0, 0, 0, 0], [0.0, 0, 0, 0], [1.0, -1.0, 0, 0]])
    learned = lp.projection()
    assert torch.equal(learned.exact_rows, base.exact_rows) and torch.equal(learned.alias_rows, base.alias_rows)
    for mode in ("strict", "relaxed"):
        assert [x.tolist() for x in learned.common_pairs(mode)] == [x.tolist() for x in base.common_pairs(mode)]
    learned.save(tmp_path / "w.safetensors")
    back = Projection.load(tmp_path / "w.safetensors")
    assert torch.equal(back.weights, learned.weights) and torch.equal(back.exact_rows, base.exact_rows)
    assert learned.weights[2, 0] > 0.6  # θ moved the row
    for dtype in (torch.bfloat16, torch.float16):  # a half-precision θ (distiller.to(dtype)) still saves and loads
        half = lp.to(dtype).projection()
        half.save(tmp_path / "h.safetensors")
        assert torch.equal(Projection.load(tmp_path / "h.safetensors").weights, half.weights)
        torch.testing.assert_close(half.weights, learned.weights, rtol=2.0 ** -7, atol=0)


def test_o5_row_stochastic_projection():
    # W = {A->a: 1; B->b: 1; C->{c: 0.909091, d: 0.090909}}, p_S = [0.5, 0.3, 0.2]
    P = Projection([[0, -1, -1, -1], [1, -1, -1, -1], [2, 3, -1, -1]],
                   [[1, 0, 0, 0], [1, 0, 0, 0], [0.909091, 0.090909, 0, 0]], 4)
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = p @ P.dense()
    np.testing.assert_allclose(q.numpy(), [0.5, 0.3, 0.181818, 0.018182], atol=1e-6)
    assert abs(float(q.sum()) - 1) < 1e-7  # W's weights are float32
    col_ptr, row_idx, val = P.csc()
    q_csc = [sum(float(val[j]) * float(p[row_idx[j]]) for j in range(col_ptr[c], col_ptr[c + 1])) for c in range(4)]
    np.testing.assert_allclose(q_csc, q.numpy(), atol=1e-7)


def test_o16_collisions():
    idx = [[0, -1, -1, -1], [0, -1, -1, -1], [2, 0, 1, -1], [5, 6, -1, -1], [7, 8, -1, -1]]
    w = [[1, 0, 0, 0], [1, 0, 0, 0], [0.9009, 0.0901, 0.0090, 0], [0.909, 0.091, 0, 0], [0.5, 0.5, 0, 0]]
    P = Projection(idx, w, 9)
    s, t = P.common_pairs("relaxed")
    assert list(zip(s.tolist(), t.tolist())) == [(0, 0), (2, 2), (3, 5)]
    s, t = P.common_pairs("strict")
    assert list(zip(s.tolist(), t.tolist())) == [(0, 0)]


def _reference_ell(s, t, w, V_S):
    """Dict reference: accumulate, keep the 4 largest (ties: lower teacher id), normalize."""
    rows = [dict() for _ in range(V_S)]
    for a, b, x in zip(s.tolist(), t.tolist(), w.tolist()):
        rows[a][b] = rows[a].get(b, 0.0) + x
    out = []
    for r in rows:
        top = sorted(r.items(), key=lambda kv: (-kv[1], kv[0]))[:4]
        total = sum(x for _, x in top)
        out.append([(b, x / total) for b, x in top])
    return out


@given(st.integers(1, 12), st.integers(1, 9), st.lists(st.tuples(st.integers(0, 11), st.integers(0, 8),
                                                                 st.sampled_from([1.0, 0.1, 0.01, 0.001, 0.5])),
                                                       max_size=60))
def test_ell_matches_reference(V_S, V_T, entries):
    entries = [(a % V_S, b % V_T, x) for a, b, x in entries]
    s = np.array([e[0] for e in entries], dtype=np.int64)
    t = np.array([e[1] for e in entries], dtype=np.int64)
    w = np.array([e[2] for e in entries], dtype=np.float64)
    indices, weights = _ell(s, t, w, V_S)
    P = Projection(indices, weights, V_T)  # validates index range / empty-slot weights
    sums = P.weights.double().sum(1)
    used = (P.indices >= 0).sum(1)
    assert bool(((used == 0) & (sums == 0) | (used > 0) & ((sums - 1).abs() < 1e-6)).all())
    for row, ref in enumerate(_reference_ell(s, t, w, V_S)):
        got = P.row(row)
        assert sorted(got) == sorted(b for b, _ in ref)
        for b, x in ref:
            assert math.isclose(got[b], x, rel_tol=1e-6)


@given(st.integers(1, 300), st.integers(4, 200), st.integers(0, 2**31 - 1), st.floats(0, 1))
def test_save_load_round_trip_bit_exact(tmp_path_factory, V_S, V_T, seed, empty):
    P = Projection.random(V_S, V_T, seed=seed, empty_rows=empty)
    path = tmp_path_factory.mktemp("w") / "w.safetensors"
    P.save(path)
    Q = Projection.load(path)
    assert torch.equal(P.indices, Q.indices) and torch.equal(P.weights, Q.weights)
    assert Q.teacher_vocab_size == V_T and Q.meta["seed"] == seed and Q.meta["format_version"] == FORMAT_VERSION == 2


def test_exact_and_alias_rows_round_trip(tmp_path):
    P = Projection([[1, -1, -1, -1], [1, 2, -1, -1]], [[1, 0, 0, 0], [0.75, 0.25, 0, 0]], 3,
                   exact_rows=[True, False], alias_rows=[False, True])
    P.save(tmp_path / "w.safetensors")
    Q = Projection.load(tmp_path / "w.safetensors")
    assert Q.exact_rows.tolist() == [True, False] and Q.alias_rows.tolist() == [False, True]
    assert Q.stats().exact == 1 and Q.stats().by_support == (1, 1, 0, 0)
    assert Projection.load(_saved_plain(tmp_path)).alias_rows is None


def _saved_plain(tmp_path):
    path = tmp_path / "plain.safetensors"
    Projection([[0, 1, -1, -1], [2, -1, -1, -1]], [[0.5, 0.5, 0, 0], [1, 0, 0, 0]], 3).save(path)
    return path


def test_version_1_file_still_loads(tmp_path):
    path = _saved_plain(tmp_path)
    _resave(path, lambda t, m: m.__setitem__("format_version", 1))
    Q = Projection.load(path)
    assert Q.meta["format_version"] == 1 and Q.alias_rows is None and Q.row(0) == {0: 0.5, 1: 0.5}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "w.safetensors"
    P = Projection.random(97, 53, seed=3, empty_rows=0.2)
    P.save(path)
    return Projection.load(path), path.read_bytes()


@given(st.data())
def test_any_single_byte_flip_is_detected(tmp_path_factory, saved, data):
    P, blob = saved
    pos = data.draw(st.integers(0, len(blob) - 1))
    flip = data.draw(st.integers(1, 255))
    bad = bytearray(blob)
    bad[pos] ^= flip
    path = tmp_path_factory.mktemp("bad") / "w.safetensors"
    path.write_bytes(bytes(bad))
    try:
        Q = Projection.load(path)
    except ProjectionFileError:
        return
    # Only bytes that carry no information (header padding) may change without an error.
    assert torch.equal(P.indices, Q.indices) and torch.equal(P.weights, Q.weights) and Q.meta == P.meta


def test_truncated_file_is_detected(tmp_path, saved):
    _, blob = saved
    for cut in (0, 7, 100, len(blob) - 1):
        (tmp_path / "w.safetensors").write_bytes(blob[:cut])
        with pytest.raises(ProjectionFileError, match="not a readable safetensors file"):
            Projection.load(tmp_path / "w.safetensors")


def _resave(path, mutate):
    """Rewrite a saved W with mutated tensors/metadata and a recomputed checksum (a consistent but invalid file)."""
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    from xtoken_ext.projection import _META_KEY, _checksum

    with safe_open(str(path), framework="np") as f:
        meta = json.loads(f.metadata()[_META_KEY])
    tensors = load_file(str(path))
    meta.pop("checksum")
    mutate(tensors, meta)
    meta["checksum"] = _checksum(meta, tensors)
    save_file(tensors, str(path), metadata={_META_KEY: json.dumps(meta)})


@pytest.mark.parametrize("mutate, message", [
    (lambda t, m: t["weights"].__setitem__((0, 0), t["weights"][0, 0] * 0.5), "do not sum to 1"),
    (lambda t, m: t["indices"].__setitem__((1, 0), 10_000), "teacher indices must lie in"),
    (lambda t, m: t.__setitem__("weights", t["weights"].astype(np.float64)), "weights must be float32"),
    (lambda t, m: m.__setitem__("student_vocab_size", 5), r"indices must be int32 \[5, 4\]"),
    (lambda t, m: m.__setitem__("format_version", 99), "unsupported format version 99"),
    (lambda t, m: t.__setitem__("extra", np.zeros(3, np.float32)), "expected tensors"),
    (lambda t, m: t.__setitem__("alias_rows", np.array([0, 2], np.uint8)), r"alias_rows must be uint8 0/1 \[2\]"),
    (lambda t, m: (t.__setitem__("alias_rows", np.zeros(2, np.uint8)), m.__setitem__("format_version", 1)),
     "expected tensors indices, weights\\[, exact_rows\\]"),  # version 1 had no alias_rows
])
def test_invalid_content_is_rejected(tmp_path, mutate, message):
    path = _saved_plain(tmp_path)
    _resave(path, mutate)
    with pytest.raises(ProjectionFileError, match=message):
        Projection.load(path)


def test_not_a_projection_file(tmp_path):
    from safetensors.numpy import save_file

    save_file({"indices": np.zeros((2, 4), np.int32)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ProjectionFileError, match="not an xtoken_ext projection file"):
        Projection.load(tmp_path / "x.safetensors")


def _reference_common(P, mode):
    """Loop reference of common_pairs: candidates per row (never an alias row; strict: exact rows only, when
    known), then per teacher the highest weight, an exact row, the lowest student."""
    alias = P.alias_rows.tolist() if P.alias_rows is not None else [False] * P.student_vocab_size
    exact = P.exact_rows.tolist() if P.exact_rows is not None else None
    best = {}
    for s in range(P.student_vocab_size):
        row = P.row(s)
        if not row or alias[s]:
            continue
        t, w = max(row.items(), key=lambda kv: kv[1])  # ties: first slot (dict keeps slot order)
        ok = (w == 1.0 and len(row) == 1 and (exact is None or exact[s])) if mode == "strict" else w >= 0.6
        key = (w, exact is not None and exact[s])
        if ok and (t not in best or key > best[t][0]):
            best[t] = (key, s)
    return sorted((s, t) for t, (_, s) in best.items())


@given(st.integers(1, 80), st.integers(4, 30), st.integers(0, 10**6), st.integers(1, 4), st.floats(0, 0.5),
       st.sampled_from(["none", "alias", "exact", "both"]))
def test_views_match_dense_reference(V_S, V_T, seed, pieces, empty, masks):
    P = Projection.random(V_S, V_T, seed=seed, empty_rows=empty, max_pieces=pieces)
    g = np.random.default_rng(seed)
    P = Projection(P.indices, P.weights, V_T, alias_rows=g.random(V_S) < 0.3 if masks in ("alias", "both") else None,
                   exact_rows=g.random(V_S) < 0.5 if masks in ("exact", "both") else None)
    d = P.dense()
    col_ptr, row_idx, val = P.csc()
    assert col_ptr.dtype == torch.int64 and row_idx.dtype == torch.int32 and val.dtype == torch.float32
    for c in range(V_T):
        rows = torch.nonzero(d[:, c]).squeeze(1)
        assert torch.equal(row_idx[col_ptr[c]:col_ptr[c + 1]].long(), rows)
        assert torch.equal(val[col_ptr[c]:col_ptr[c + 1]].double(), d[rows, c])
    assert torch.equal(P.covered_columns(), (d > 0).any(0))
    for mode in ("strict", "relaxed"):
        s, t = P.common_pairs(mode)
        assert list(zip(s.tolist(), t.tolist())) == _reference_common(P, mode)


# ---------------------------------------------------------------------- tiny byte-level BPE tokenizers


def _bpe(merges=(), extra=(), specials=(), **roles):
    """A byte-level BPE tokenizer: the 256 byte symbols, the merged pieces, ``extra`` pieces without a merge, then
    ``specials`` (added special tokens); ``roles`` go to the HF wrapper (bos_token=...)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for piece in [a + b for a, b in merges] + list(extra):
        vocab.setdefault(piece, len(vocab))
    t = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    t.pre_tokenizer, t.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    t.add_special_tokens([AddedToken(s, special=True) for s in specials])
    return PreTrainedTokenizerFast(tokenizer_object=t, **roles)


def test_w_cache_and_load_tell_apart_tokenizers_with_other_merges(tmp_path, monkeypatch):
    from xtoken_ext.tokenizers import token_table

    monkeypatch.setenv("XTOKEN_CACHE", str(tmp_path))
    student = _bpe([("a", "b"), ("ab", "c")])
    merged = _bpe([("a", "b")])  # "abc" -> ab + c
    unmerged = _bpe(extra=["ab"])  # the same vocabulary without the merge: "abc" -> a + b + c
    assert token_table(merged).fingerprint == token_table(unmerged).fingerprint  # bytes and roles are equal
    abc = student.convert_tokens_to_ids("abc")
    W_merged = Projection.from_tokenizers(student, merged, progress=False)
    W_unmerged = Projection.from_tokenizers(student, unmerged, progress=False)  # not the cached W_merged
    assert len(W_merged.row(abc)) == 2 and len(W_unmerged.row(abc)) == 3
    assert token_table(merged).behaviour != token_table(unmerged).behaviour
    assert len(list((tmp_path / "projections").glob("*.safetensors"))) == 2
    W_merged.save(tmp_path / "w.safetensors")
    Projection.load(tmp_path / "w.safetensors", expect_student=student, expect_teacher=merged)
    with pytest.warns(UserWarning, match="teacher tokenizer with the same vocabulary but another behaviour hash"):
        Projection.load(tmp_path / "w.safetensors", expect_teacher=unmerged)
    # A file written before the behaviour hash existed is checked by fingerprint only.
    meta = {k: v for k, v in W_merged.meta.items() if not k.endswith("_behaviour")}
    Projection(W_merged.indices, W_merged.weights, W_merged.teacher_vocab_size, meta).save(tmp_path / "old.safetensors")
    Projection.load(tmp_path / "old.safetensors", expect_student=student, expect_teacher=unmerged)


def test_shared_bos_eos_id_maps_as_the_eos():
    # GPT-2's <|endoftext|> is both BOS and EOS; W maps it as the EOS (a model never predicts a BOS), in both
    # directions, and the other side's BOS finds no BOS there.
    gpt2_like = _bpe(specials=["<|endoftext|>"], bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    qwen_like = _bpe(specials=["<|endoftext|>"], eos_token="<|endoftext|>")  # no BOS
    llama_like = _bpe(specials=["<|begin_of_text|>", "<|end_of_text|>"], bos_token="<|begin_of_text|>",
                      eos_token="<|end_of_text|>")
    for s, t in ((gpt2_like, qwen_like), (qwen_like, gpt2_like), (gpt2_like, llama_like), (llama_like, gpt2_like)):
        W = Projection.from_tokenizers(s, t, cache=False, progress=False)
        assert W.row(s.eos_token_id) == {t.eos_token_id: 1.0}, (s.eos_token, t.eos_token)
    assert Projection.from_tokenizers(llama_like, gpt2_like, cache=False, progress=False).row(
        llama_like.bos_token_id) == {}


def test_threads_building_one_w_do_not_share_a_temp_file(tmp_path, monkeypatch):
    # Each cache write has its own temp name: with one per process, one thread's os.replace took the file another
    # was about to move (FileNotFoundError).
    import threading

    monkeypatch.setenv("XTOKEN_CACHE", str(tmp_path))
    pair = (_bpe([("a", "b")]), _bpe([("b", "c")]))
    errors = []
    for _ in range(20):
        for f in (tmp_path / "projections").glob("*"):
            f.unlink()
        barrier = threading.Barrier(4)

        def build():
            barrier.wait()
            try:
                Projection.from_tokenizers(*pair, progress=False)
            except Exception as e:  # noqa: BLE001 - collected and reported below
                errors.append(repr(e))

        threads = [threading.Thread(target=build) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert [f.suffix for f in (tmp_path / "projections").iterdir()] == [".safetensors"]  # no temp file left


@pytest.mark.parametrize("kwargs, exc, msg", [
    (dict(max_pieces=2.5), TypeError, "max_pieces must be an int"),
    (dict(max_pieces=True), TypeError, "max_pieces must be an int"),
    (dict(max_pieces=5), ValueError, r"max_pieces must be in \[1, 4\]"),
    (dict(student_vocab_size=300.7), TypeError, "student_vocab_size must be an int"),
    (dict(teacher_vocab_size="300"), TypeError, "teacher_vocab_size must be an int"),
    (dict(reverse_pass="no"), TypeError, "reverse_pass must be a bool"),
    (dict(canonical_exact=1), TypeError, "canonical_exact must be a bool"),
    (dict(gamma="0.1"), TypeError, "gamma must be a real number"),
    (dict(gamma=True), TypeError, "gamma must be a real number"),
    (dict(gamma=float("nan")), ValueError, r"gamma must be in \(0, 1\]"),
])
def test_from_tokenizers_checks_argument_types(kwargs, exc, msg):
    # int(300.7) / bool("no") built, and cached, a W nobody asked for; '0.1' < 1 was a bare TypeError.
    tok = _bpe([("a", "b")])
    with pytest.raises(exc, match=msg):
        Projection.from_tokenizers(tok, tok, cache=False, progress=False, **kwargs)


def test_unwritable_cache_warns_and_returns_the_built_w(tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")  # the cache root is a file: mkdir fails
    monkeypatch.setenv("XTOKEN_CACHE", str(blocker))
    tok = _bpe([("a", "b")])
    with pytest.warns(UserWarning, match=r"W was built but not cached: cannot write .*not_a_folder.*XTOKEN_CACHE"):
        W = Projection.from_tokenizers(tok, tok, progress=False)
    assert W.row(tok.convert_tokens_to_ids("ab")) == {tok.convert_tokens_to_ids("ab"): 1.0}


def test_load_and_to_outside_the_meta_device(tmp_path):
    # torch.as_tensor followed the default device: inside `with torch.device("meta")` load made W meta and crashed.
    P = Projection.random(10, 20, seed=1)
    P.save(tmp_path / "w.safetensors")
    with torch.device("meta"):
        Q = Projection.load(tmp_path / "w.safetensors")
        R = Projection.random(10, 20, seed=1)  # its CPU generator met meta tensors: a device error
    assert Q.device == torch.device("cpu") and torch.equal(Q.weights, P.weights)
    assert R.device == torch.device("cpu") and torch.equal(R.weights, P.weights) and torch.equal(R.indices, P.indices)
    with pytest.raises(ValueError, match="needs its data"):
        P.to("meta")


def test_audit_of_a_w_narrower_than_the_student_tokenizer():
    tok = _bpe([("a", "b")])
    P = Projection.random(len(tok) - 1, 10)
    with pytest.raises(ValueError, match=f"W has {len(tok) - 1} student rows but the student tokenizer has {len(tok)}"):
        P.audit(tok)


def test_load_of_a_directory_says_so(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        Projection.load(tmp_path)


def test_save_turns_a_safetensors_write_error_into_an_oserror(tmp_path, monkeypatch):
    """safetensors reports a read-only or full disk with its own SafetensorError, which is not an OSError: the CLI
    printed a traceback for it after the whole build."""
    import safetensors.torch
    from safetensors import SafetensorError

    def fail(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: Read-only file system (os error 30)")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="cannot write it .*Read-only file system"):
        Projection.random(5, 7, seed=0).save(tmp_path / "w.safetensors")
