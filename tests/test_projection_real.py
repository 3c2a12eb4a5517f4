"""Projection W on real tokenizers (offline): Llama-3 x Qwen3 (digit-splitting teacher), Llama-3 x cl100k
(Phi-4 family), SentencePiece (Mistral 32k, byte fallback) on either side and on both; common sets and audit with
byte-fallback duplicates; special tokens by role across families; coverage audit vs paper Table 8; the on-disk
cache; the CLI."""
import numpy as np
import pytest

from xtoken_ext.projection import Projection, ProjectionFileError
from xtoken_ext.tokenizers import token_table

O1_3 = [0.900901, 0.090090, 0.009009]
O1_4 = [0.900090, 0.090009, 0.009001, 0.000900]


def _build(student, teacher, **kw):
    return Projection.from_tokenizers(student, teacher, cache=False, progress=False, **kw)


@pytest.fixture(scope="module")
def llama(offline_tok):
    return offline_tok("llama3")


@pytest.fixture(scope="module")
def qwen(offline_tok):
    return offline_tok("qwen3")


@pytest.fixture(scope="module")
def spm(offline_tok):
    return offline_tok("mistral-spm")


@pytest.fixture(scope="module")
def llama_qwen(llama, qwen):
    # Logit widths of the real models: Llama-3.2 128,256 (= len(tokenizer)), Qwen3 151,936 (tokenizer 151,669).
    return _build(llama, qwen, student_vocab_size=128256, teacher_vocab_size=151936)


def sid(tok, text: str) -> int:
    """Student id of the token whose canonical bytes are ``text``."""
    return token_table(tok).token_bytes.index(text.encode("utf-8") if isinstance(text, str) else text)


def row(proj, i):
    return {t: pytest.approx(w, abs=5e-7) for t, w in proj.row(i).items()}


def test_llama_qwen_numerals_against_digit_splitting_teacher(llama, qwen, llama_qwen):
    P = llama_qwen
    assert (P.student_vocab_size, P.teacher_vocab_size) == (128256, 151936)
    # Qwen ids by hand: "0" 15, "1" 16, "2" 17; Qwen splits every digit.
    assert qwen.convert_tokens_to_ids(["0", "1", "2"]) == [15, 16, 17]
    assert row(P, sid(llama, "201")) == {17: O1_3[0], 15: O1_3[1], 16: O1_3[2]}
    assert row(P, sid(llama, "202")) == {17: O1_3[0] + O1_3[2], 15: O1_3[1]}  # "2" repeats: accumulates
    assert P.row(sid(llama, "000")) == {15: 1.0}  # O-2: ["0","0","0"] -> 1.0
    assert P.row(sid(llama, " the")) == {qwen.convert_tokens_to_ids("Ġthe"): 1.0}
    s, _ = P.common_pairs("strict")
    assert sid(llama, "201") not in s.tolist() and sid(llama, "7") in s.tolist()


def test_llama_qwen_truncation_and_drop(llama, qwen, llama_qwen):
    # " způsob" -> Qwen ["Ġz", "p", "Å¯", "s", "ob"]: 5 pieces, only the first 4 kept with the l=4 weights (O-2).
    i = sid(llama, " způsob")
    pieces = qwen(" způsob", add_special_tokens=False)["input_ids"]
    assert pieces == [1147, 79, 51253, 82, 674]
    assert row(llama_qwen, i) == dict(zip(pieces[:4], O1_4))
    dropped = _build(llama, qwen, overflow="drop")
    assert dropped.row(i) == {} and dropped.row(sid(llama, "201")) == llama_qwen.row(sid(llama, "201"))
    assert dropped.meta["build"]["dropped (> 4 pieces)"] == llama_qwen.meta["build"]["more than 4 pieces"] > 0


def test_llama_qwen_specials_padding_and_stats(llama, qwen, llama_qwen):
    P = llama_qwen
    assert P.row(llama.bos_token_id) == {}  # Qwen has no BOS
    assert P.row(llama.eos_token_id) == {qwen.eos_token_id: 1.0}
    reserved = llama.convert_tokens_to_ids("<|reserved_special_token_0|>")
    assert P.row(reserved) == {}  # no teacher special of that name
    assert not bool(P.covered_columns()[len(qwen):].any())  # padded teacher logits are never reached
    st = P.stats()
    assert st.empty == 1 + 253  # BOS + the specials without a role twin (reserved, header markers)
    assert st.exact + st.one_piece + sum(st.by_support[1:]) + st.empty == st.rows
    # Every non-exact row is re-tokenized except the unmatched specials; EOS and end-of-turn are exact.
    assert st.build["re-tokenized"] == st.rows - st.exact - 254 and st.build["unmappable"] == 0
    assert st.build["duplicate bytes, not emitted"] == 0 and not bool(P.alias_rows.any())


def test_llama_qwen_is_deterministic_and_has_valid_rows(llama, qwen, llama_qwen):
    again = _build(llama, qwen, student_vocab_size=128256, teacher_vocab_size=151936)
    assert np.array_equal(again.indices.numpy(), llama_qwen.indices.numpy())
    assert np.array_equal(again.weights.numpy(), llama_qwen.weights.numpy())
    sums = llama_qwen.weights.double().sum(1).numpy()
    used = (llama_qwen.indices >= 0).any(1).numpy()
    assert np.all(np.abs(sums[used] - 1) < 1e-6) and np.all(sums[~used] == 0)


def test_invalid_utf8_student_token_is_encoded_by_bytes(llama, qwen, llama_qwen):
    # Llama b" \xd9" (half of an Arabic letter) has no Qwen twin; decode() would give " \ufffd".
    i = sid(llama, b" \xd9")
    assert llama_qwen.row(i) == {qwen.convert_tokens_to_ids("Ġ"): pytest.approx(10 / 11),
                                 qwen.convert_tokens_to_ids("Ù"): pytest.approx(1 / 11)}


def test_vocab_sizes_smaller_than_tokenizer_are_rejected(llama, qwen):
    with pytest.raises(ValueError, match="smaller than the tokenizers"):
        _build(llama, qwen, teacher_vocab_size=151000)


def test_audit_llama_qwen_table8(llama_qwen):
    rep = llama_qwen.audit()
    by = {c.name: c for c in rep.classes}
    # Table 8, Qwen3-4B column: 2-digit 0/100, 3-digit 0/1000 reproduced. (1-digit: the paper lists 13 items;
    # Llama has 10 one-digit tokens, all common. Its "ASCII punctuation 88" is not defined precisely enough.)
    assert (by["2-digit"].common, by["2-digit"].total) == (0, 100)
    assert (by["3-digit"].common, by["3-digit"].total) == (0, 1000)
    assert (by["1-digit"].common, by["1-digit"].total) == (10, 10)
    assert rep.recommendation == "pkl"
    assert "'201'" in by["3-digit"].outside
    text = str(rep)
    assert "recommendation: PKL" in text and "3-digit" in text
    assert rep.to_dict()["classes"][4]["total"] == 1000


def test_llama_cl100k_numerals_exact_and_audit(offline_tok, llama):
    cl = offline_tok("cl100k")
    P = _build(llama, cl)
    assert P.row(sid(llama, "201")) == {cl.convert_tokens_to_ids("201"): 1.0}
    rep = P.audit()
    by = {c.name: c for c in rep.classes}
    # Table 8, Phi-4-mini column: 2-digit 100/100, 3-digit 1000/1000 -> H-KL.
    assert (by["2-digit"].common, by["3-digit"].common) == (100, 1000)
    assert rep.recommendation == "hkl"


def test_sentencepiece_student(llama, spm):
    P = _build(spm, llama)
    # "▁the" is " the" (decode([id]) would drop the space), "<0x0A>" is "\n".
    assert P.row(spm.convert_tokens_to_ids("▁the")) == {sid(llama, " the"): 1.0}
    assert P.row(spm.convert_tokens_to_ids("the")) == {sid(llama, "the"): 1.0}
    assert P.row(spm.convert_tokens_to_ids("<0x0A>")) == {sid(llama, "\n"): 1.0}
    assert P.row(spm.convert_tokens_to_ids("<0xE5>")) == {sid(llama, b"\xe5"): 1.0}
    assert P.row(spm.bos_token_id) == {llama.bos_token_id: 1.0}
    assert P.row(spm.eos_token_id) == {llama.eos_token_id: 1.0}
    assert P.row(spm.unk_token_id) == {}


DIGITS = "0123456789"


def _emitted_digits(spm):
    """The ids the Mistral tokenizer really produces for 0..9 (it prepends "▁" to the text)."""
    ids = spm(DIGITS, add_special_tokens=False)["input_ids"]
    assert spm.convert_ids_to_tokens(ids[:1]) == ["▁"]
    return ids[1:]


def test_byte_fallback_student_common_sets_hold_the_emitted_tokens(llama, spm):
    P = _build(spm, llama)
    digits, fallback = _emitted_digits(spm), spm.convert_tokens_to_ids([f"<0x{ord(d):02X}>" for d in DIGITS])
    teacher_digits = llama.convert_tokens_to_ids(list(DIGITS))
    # Both spellings map onto the teacher digit, but only the emitted one is paired with it.
    assert [P.row(i) for i in fallback] == [P.row(i) for i in digits] == [{t: 1.0} for t in teacher_digits]
    for mode in ("strict", "relaxed"):
        pairs = dict(zip(*(x.tolist() for x in P.common_pairs(mode))))
        assert [pairs.get(i) for i in digits] == teacher_digits and not set(fallback) & set(pairs), mode
    pairs = dict(zip(*(x.tolist() for x in P.common_pairs("strict"))))
    # "!" is the emitted 28808, not <0x21>; "\r" is "\r", not "\r\r" (one-hot {"\r": 1} by pass 2, no string match).
    assert spm.convert_ids_to_tokens([k for k, v in pairs.items() if v == sid(llama, "\r")]) == ["\r"]
    assert spm.convert_ids_to_tokens([k for k, v in pairs.items() if v == sid(llama, "!")]) == ["!"]
    alias = np.flatnonzero(P.alias_rows.numpy())
    assert set(spm.convert_ids_to_tokens(alias.tolist())) <= {f"<0x{b:02X}>" for b in range(256)}
    assert len(alias) == P.stats().build["duplicate bytes, not emitted"] == 125
    rep = P.audit()
    by = {c.name: c for c in rep.classes}
    # Was 1-digit 10/20 (each digit counted twice, the fallback twins in the common set) and P-KL.
    assert (by["1-digit"].common, by["1-digit"].total) == (10, 10) and rep.recommendation == "hkl"
    assert by["whitespace run"].total == 22 and by["whitespace run"].outside == ["'\\r\\r'"]  # Llama: "\r", "\r"


def test_byte_fallback_teacher_common_sets_hold_the_emitted_tokens(llama, spm):
    P = _build(llama, spm)
    digits = _emitted_digits(spm)
    assert [P.row(sid(llama, d)) for d in DIGITS] == [{t: 1.0} for t in digits]
    for mode in ("strict", "relaxed"):
        pairs = dict(zip(*(x.tolist() for x in P.common_pairs(mode))))
        assert [pairs.get(sid(llama, d)) for d in DIGITS] == digits, mode
    assert P.alias_rows is not None and not bool(P.alias_rows.any())  # Llama has no duplicate bytes


def test_byte_fallback_on_both_sides(spm):
    P = _build(spm, spm)
    digits, fallback = _emitted_digits(spm), spm.convert_tokens_to_ids([f"<0x{ord(d):02X}>" for d in DIGITS])
    assert [P.row(i) for i in fallback] == [{t: 1.0} for t in digits]  # the teacher's emitted twin, both rows
    s, t = (x.numpy() for x in P.common_pairs("strict"))
    alias = P.alias_rows.numpy()
    # Identity on every emitted token: no alias row, and each pair is (i, i).
    assert np.array_equal(s, t) and not alias[s].any() and set(digits) <= set(s.tolist())
    table = token_table(spm)
    normal = {b for b, r in zip(table.token_bytes, table.roles) if r == 0 and b}
    rep = P.audit()
    # Each distinct string counted once, all of them in the exact common set.
    assert sum(c.total for c in rep.classes) == len(normal) == sum(c.common for c in rep.classes)


def test_special_tokens_by_role_across_families(llama, qwen, spm, llama_qwen):
    eot_l, eot_q = llama.convert_tokens_to_ids("<|eot_id|>"), qwen.convert_tokens_to_ids("<|im_end|>")
    lq, ql = llama_qwen, _build(qwen, llama)
    assert lq.row(eot_l) == {eot_q: 1.0} and ql.row(eot_q) == {eot_l: 1.0}
    assert lq.row(llama.eos_token_id) == {qwen.eos_token_id: 1.0} and ql.row(qwen.eos_token_id) == {
        llama.eos_token_id: 1.0}
    assert bool(lq.exact_rows[eot_l]) and (eot_l, eot_q) in set(zip(*(x.tolist() for x in lq.common_pairs("strict"))))
    # Mistral has no end-of-turn token: its </s> stands in (test_sentencepiece_teacher); </s> itself stays EOS <-> EOS
    # (test_sentencepiece_student).
    # An instruct config whose EOS is <|im_end|> (and <|endoftext|> the pad): <|im_end|> keeps the end-of-turn role
    # and still meets <|eot_id|>, Mistral's </s> falls back onto it, and the pad row stays empty (DESIGN §2).
    from transformers import PreTrainedTokenizerFast

    instruct = PreTrainedTokenizerFast(tokenizer_object=qwen.backend_tokenizer, eos_token="<|im_end|>",
                                       pad_token="<|endoftext|>")
    assert _build(spm, instruct).row(spm.eos_token_id) == {eot_q: 1.0}
    back = _build(instruct, llama)
    assert back.row(eot_q) == {eot_l: 1.0} and back.row(instruct.pad_token_id) == {}


def test_sentencepiece_teacher(llama, spm):
    P = _build(llama, spm)
    d = spm.convert_tokens_to_ids
    # No prefix space is added: "201" -> ["2", "0", "1"], not ["▁2", ...]; byte fallback for invalid UTF-8.
    assert row(P, sid(llama, "201")) == {d("2"): O1_3[0], d("0"): O1_3[1], d("1"): O1_3[2]}
    assert P.row(sid(llama, b" \xd9")) == {d("▁"): pytest.approx(10 / 11), d("<0xD9>"): pytest.approx(1 / 11)}
    assert P.row(sid(llama, "\n\n")) == {d("<0x0A>"): 1.0}
    assert P.row(sid(llama, "!")) == {d("!"): 1.0} and d("<0x21>") < d("!")  # not the byte-fallback twin
    # No end-of-turn token in Mistral: its EOS </s>, which ends turns there, stands in.
    assert P.row(llama.convert_tokens_to_ids("<|eot_id|>")) == {spm.eos_token_id: 1.0}
    # The teacher's settings are restored after the build.
    assert spm.convert_ids_to_tokens(spm("the", add_special_tokens=False)["input_ids"]) == ["▁the"]
    assert spm("<s>", add_special_tokens=False)["input_ids"] == [spm.bos_token_id]


def test_raw_string_exact_match(llama, spm):
    # canonical_exact=False compares convert_ids_to_tokens strings (the release default): "▁the" != "Ġthe", so
    # the row comes from pass 2 instead (same mapping, not flagged exact).
    i = spm.convert_tokens_to_ids("▁the")
    canon, raw = _build(spm, llama), _build(spm, llama, canonical_exact=False)
    assert raw.row(i) == canon.row(i) == {sid(llama, " the"): 1.0}
    assert bool(canon.exact_rows[i]) and not bool(raw.exact_rows[i])
    assert raw.row(spm.bos_token_id) == {llama.bos_token_id: 1.0}  # specials still match by role
    assert raw.stats().exact < canon.stats().exact


def test_student_padding_rows(offline_tok, spm):
    gpt2 = offline_tok("gpt2")
    P = _build(gpt2, spm, student_vocab_size=len(gpt2) + 7)
    assert P.student_vocab_size == len(gpt2) + 7 and all(P.row(len(gpt2) + k) == {} for k in range(7))
    assert P.stats().build["padding rows"] == 7


def test_reverse_pass_adds_teacher_to_student_entries(llama, spm):
    fwd, rev = _build(spm, llama), _build(spm, llama, reverse_pass=True)
    exact = fwd.exact_rows.numpy()
    assert np.array_equal(rev.indices.numpy()[exact], fwd.indices.numpy()[exact])  # exact rows untouched
    changed = (rev.indices.numpy() != fwd.indices.numpy()).any(1)
    assert changed.sum() > 0 and not changed[exact].any()


def test_cache_round_trip_and_corruption(tmp_path, monkeypatch, offline_tok, spm):
    gpt2 = offline_tok("gpt2")
    monkeypatch.setenv("XTOKEN_CACHE", str(tmp_path))
    first = Projection.from_tokenizers(gpt2, spm, progress=False)
    files = list((tmp_path / "projections").glob("*.safetensors"))
    assert len(files) == 1
    second = Projection.from_tokenizers(gpt2, spm, progress=False)
    assert np.array_equal(first.weights.numpy(), second.weights.numpy())
    assert second.meta["checksum"] and second.audit().classes  # the token tables are attached on a cache hit
    other = Projection.from_tokenizers(gpt2, spm, gamma=0.2, progress=False)
    assert len(list((tmp_path / "projections").glob("*.safetensors"))) == 2 and other.row(
        sid(gpt2, "201")) != first.row(sid(gpt2, "201"))
    files[0].write_bytes(files[0].read_bytes()[:-10])
    with pytest.warns(UserWarning, match="rebuilding W"):
        third = Projection.from_tokenizers(gpt2, spm, progress=False)
    assert np.array_equal(first.indices.numpy(), third.indices.numpy())
    Projection.load(files[0])  # rewritten intact


def test_load_checks_tokenizers(tmp_path, offline_tok, spm):
    gpt2 = offline_tok("gpt2")
    P = _build(gpt2, spm)
    P.save(tmp_path / "w.safetensors")
    Projection.load(tmp_path / "w.safetensors", expect_student=gpt2, expect_teacher=spm)
    with pytest.raises(ProjectionFileError, match="another student tokenizer"):
        Projection.load(tmp_path / "w.safetensors", expect_student=spm)
    Q = Projection.load(tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="needs the student tokenizer"):
        Q.audit()
    assert Q.audit(gpt2).to_dict() == P.audit().to_dict()


def test_cli_build_inspect_audit(tmp_path, capsys):
    from xtoken_ext.cli import main

    out = tmp_path / "w.safetensors"
    assert main(["build", "offline:gpt2", "offline:mistral-spm", "-o", str(out), "--no-cache"]) == 0
    assert "exact (pass 1)" in capsys.readouterr().out
    assert main(["inspect", str(out), "--student", "offline:gpt2", "--teacher", "offline:mistral-spm",
                 "--token", "201", "--id", "0", "--id", "50256"]) == 0
    text = capsys.readouterr().out
    assert "'<|endoftext|>'(50256) -> 1.000000·'</s>'(2)" in text  # not the role markers "\xff<eos>"
    assert "'201'(1264) -> 0.900901·'2'(28750) + 0.090090·'0'(28734) + 0.009009·'1'(28740)" in text
    assert "'!'(0) -> 1.000000·'!'(28808)" in text  # the regular "!", not the byte-fallback <0x21> (36)
    assert main(["audit", "offline:gpt2", "offline:mistral-spm", "--no-cache"]) == 0
    assert "recommendation: PKL" in capsys.readouterr().out


def test_cli_inspect_emitted_ids_padding_rows_json_and_errors(tmp_path, capsys):
    """inspect --token takes the id the tokenizer emits, not a byte-fallback alias (Mistral's "0" is 28734, its
    <0x30> 51); --id of a padding row prints (empty); audit --json is strict JSON (no NaN); bad input is one line
    on stderr with exit code 2, not a traceback."""
    import json

    from xtoken_ext.cli import main

    w = tmp_path / "w.safetensors"
    assert main(["build", "offline:mistral-spm", "offline:gpt2", "-o", str(w), "--no-cache",
                 "--student-vocab-size", "32008"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(w), "--student", "offline:mistral-spm", "--token", "0", "--id", "32005"]) == 0
    text = capsys.readouterr().out
    assert "'0'(28734) -> " in text and "(51)" not in text and "(32005) -> (empty)" in text
    assert main(["audit", "offline:mistral-spm", "offline:llama3", "--no-cache", "--json"]) == 0
    report = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert any(c["total"] == 0 and c["percent"] is None for c in report["classes"])
    for argv, msg in ((["inspect", str(w), "--token", "0"], "--token needs --student"),
                      (["inspect", str(w), "--id", "32008"], "--id 32008 is outside W's student ids [0, 32008)"),
                      (["inspect", str(tmp_path / "missing.safetensors")], "missing.safetensors"),
                      (["build", "offline:nope", "offline:gpt2", "-o", str(w)], "offline"),
                      (["build", "offline:gpt2", "offline:gpt2", "-o", str(w), "--gamma", "0"], "gamma"),
                      (["build", "offline:gpt2", "offline:gpt2", "-o", str(tmp_path), "--no-cache"], str(tmp_path))):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"xtoken {argv[0]}: error: ") and msg in err and "Traceback" not in err, (argv, err)


def test_build_leaves_the_callers_tokenizer_untouched(offline_tok, spm):
    # Another thread (a data loader) tokenizing with the teacher during a build sees its usual encoding: the build
    # re-tokenizes with a private literal copy, never by switching off the caller's prefix space in place.
    import threading

    gpt2 = offline_tok("gpt2")
    text = "Hello </s> world"
    want = spm(text)["input_ids"]
    seen, stop = set(), threading.Event()

    def encode_loop():
        while not stop.is_set():
            seen.add(tuple(spm(text)["input_ids"]))

    reader = threading.Thread(target=encode_loop)
    reader.start()
    try:
        _build(gpt2, spm)
    finally:
        stop.set()
        reader.join()
    assert seen == {tuple(want)}
