"""`xtoken bench` end to end (quick sizes): every suite runs offline and prints its table with a ratio column; the
suites that plot write their PNG into $XTOKEN_BENCH_DIR (or say that matplotlib is missing)."""
import importlib.util
import re

import pytest

from xtoken_ext.bench import SUITES
from xtoken_ext.cli import main

PLOTS = ("linear_head-quick.png", "scaling-quick.png")


def test_bench_quick_runs_every_suite(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("XTOKEN_BENCH_DIR", str(tmp_path))
    assert main(["bench", "--quick"]) == 0
    out = capsys.readouterr().out
    for suite in SUITES:
        assert f"=== {suite} ===" in out
        section = out.split(f"=== {suite} ===", 1)[1].split("===", 1)[0]
        assert re.search(r"\d+(\.\d+)?x\b", section), f"{suite}: no ratio column printed"
    scaling = out.split("=== scaling ===", 1)[1].split("===", 1)[0]
    for series in ("aligner auto", "aligner dp", "W build", "P-KL vs rows", "H-KL vs V", "GOLD vs rows"):
        row = (rf"^{series}\s+[\d,]+\.\.[\d,]+\s+\d+x.*?-?\d+\.\d\d\s+-?\d+\.\d\d\s+"
               r"(linear|constant|sublinear|superlinear|decreasing)\b")  # range, size ratio, b, last 2, verdict
        assert re.search(row, scaling, re.M), f"scaling: no growth exponent / verdict row for {series}"
    if importlib.util.find_spec("matplotlib"):
        for name in PLOTS:
            assert (tmp_path / name).stat().st_size > 0
            assert f"plot written to {tmp_path / name}" in out
    else:
        assert out.count("skipped: matplotlib is not installed") == len(PLOTS)


def test_bench_rejects_unknown_suite(capsys):
    with pytest.raises(SystemExit) as e:  # argparse's choices, listed in --help too
        main(["bench", "--suite", "nope"])
    assert e.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_build_checks_the_output_path_before_building_w(capsys, monkeypatch, tmp_path):
    """A W for large vocabularies takes minutes: a folder or a path in a missing folder fails first, not after."""
    import xtoken_ext.cli as cli

    def never(args):
        raise AssertionError("W was built before the output path was checked")

    monkeypatch.setattr(cli, "_projection", never)
    (tmp_path / "file.py").write_text("")
    for out, msg in ((tmp_path, "is a directory"), (tmp_path / "no" / "w.safetensors", "does not exist"),
                     (tmp_path / "file.py" / "w.safetensors", "file.py is a file, not a folder")):
        assert main(["build", "offline:gpt2", "offline:gpt2", "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("xtoken build: error: ") and msg in err, err


def test_teacher_cache_inputs_it_reads_or_refuses_before_running(capsys, monkeypatch, tmp_path, offline_tok):
    """A .json file (a list, or JSON Lines) is read as rows (it was cached as raw JSON text), a UTF-8 BOM is read as
    datasets reads it (dropped from JSON, kept in a text file), a lone surrogate, a device that does not exist (CUDA
    or another backend), a file that is not UTF-8, one JSON object in a .json file, a tokenizer larger than the
    model's embedding and a text longer than its positions are one-line errors (tracebacks, some mid-run), and a
    resumed run may spell the local model path differently (it was refused)."""
    import json

    import datasets
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import xtoken_ext as xt
    from xtoken_ext.cli import _read_texts

    rows = [{"text": "hi"}, {"text": "two words"}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "bom.jsonl").write_bytes(("\ufeff" + "".join(json.dumps(r) + "\n" for r in rows)).encode())
    for name in ("list.json", "lines.json", "bom.jsonl"):
        assert _read_texts(str(tmp_path / name), "text") == ["hi", "two words"], name
    # a text file keeps its BOM in the first text, as load_dataset("text") does (dropping it missed that row's cache
    # entry in training: KeyError)
    (tmp_path / "bom.txt").write_bytes("\ufeffhi\ntwo words\n".encode())
    for kind, name in (("text", "bom.txt"), ("json", "bom.jsonl")):
        want = list(datasets.load_dataset(kind, data_files=str(tmp_path / name), cache_dir=str(tmp_path / "ds"),
                                          split="train")["text"])
        assert _read_texts(str(tmp_path / name), "text") == want, name
    assert want[0] == "hi" and _read_texts(str(tmp_path / "bom.txt"), "text")[0] == "\ufeffhi"
    # a text file's blank lines are texts, as datasets.load_dataset("text") reads them (the collator makes them
    # empty examples): skipped, the cache missed those rows and training raised KeyError
    (tmp_path / "blank.txt").write_text("first\n\n   \nthird\n")
    want = list(datasets.load_dataset("text", data_files=str(tmp_path / "blank.txt"), cache_dir=str(tmp_path / "ds"),
                                      split="train")["text"])
    assert _read_texts(str(tmp_path / "blank.txt"), "text") == want == ["first", "", "   ", "third"]
    sep = {"text": "one\u2028line"}  # JSON holds U+2028 unescaped: a line separator to str.splitlines
    (tmp_path / "sep.jsonl").write_text(json.dumps(sep, ensure_ascii=False) + "\n", encoding="utf-8")
    assert _read_texts(str(tmp_path / "sep.jsonl"), "text") == ["one\u2028line"]
    (tmp_path / "lone.jsonl").write_text('{"text": "a \\ud800 b"}\n')
    tok = offline_tok("gpt2")
    torch.manual_seed(0)
    for name, V, n_pos in (("m", len(tok), 16), ("small", 1000, 64)):
        GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=n_pos, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
            tmp_path / name)
    (tmp_path / "long.txt").write_text("hello world " * 20 + "\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))  # the codec's message named no file
    (tmp_path / "pretty.json").write_text(json.dumps({"text": "hi"}, indent=2))  # "pretty.json:1: not a JSON line"
    capsys.readouterr()
    base = ["--tokenizer", "offline:gpt2", "-k", "2", "-o", str(tmp_path / "c")]
    for model, data, extra, msg in (("m", "lone.jsonl", [], "lone.jsonl:1: the text holds a lone surrogate"),
                                    ("m", "bom.txt", ["--device", "gpu"], "--device 'gpu'"),
                                    ("m", "bom.txt", ["--device", "cuda:99"], "no such CUDA device"),
                                    ("m", "bom.txt", ["--device", "mps"], "--device 'mps': not available here"),
                                    ("m", "latin1.txt", [], "latin1.txt: not UTF-8 text (byte 3: invalid"),
                                    ("m", "pretty.json", [], "pretty.json: one JSON object; a .json file holds"),
                                    ("small", "bom.txt", [], "the model embeds 1000"),
                                    ("m", "long.txt", [], "pass --max-length 16")):
        assert main(["teacher-cache", str(tmp_path / model), str(tmp_path / data), *base, *extra]) == 2
        line = capsys.readouterr().err.rstrip().replace("\r", "\n").split("\n")[-1]  # after a progress bar
        assert line.startswith("xtoken teacher-cache: error: ") and msg in line, line
    assert main(["teacher-cache", str(tmp_path / "m"), str(tmp_path / "bom.txt"), *base]) == 0
    monkeypatch.chdir(tmp_path)
    for spelling in ("./m", str((tmp_path / "m").resolve()) + "/"):
        assert main(["teacher-cache", spelling, str(tmp_path / "bom.txt"), *base]) == 0, capsys.readouterr().err
    assert len(xt.teacher_cache.load(tmp_path / "c")) == 2
    modes = {f.name.split("-")[0]: f.stat().st_mode & 0o777 for f in (tmp_path / "c").iterdir()}
    assert modes["shard"] == modes["manifest.json"], modes  # the umask's mode, not safetensors' 0600
    assert main(["teacher-cache", "m", "blank.txt", *base[:-1], "blank-cache"]) == 0
    with pytest.warns(UserWarning, match="empty or whitespace-only"):
        batch = xt.Collator(tok, [tok], teacher_caches=[xt.teacher_cache.load("blank-cache")])(want)
    assert batch["teachers"][0]["topk_logprobs"].shape[0] == 4


def test_cli_error_conventions(capsys, monkeypatch, tmp_path):
    """XTOKEN_TRACEBACK=0 keeps the one-line errors (any value turned tracebacks on); bench errors carry the
    `xtoken bench: error:` prefix."""
    monkeypatch.setenv("XTOKEN_TRACEBACK", "0")
    assert main(["build", "offline:gpt2", "offline:gpt2", "-o", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("xtoken build: error: ")
    # a file as the plots' folder is refused before any suite runs (it failed after the suite's minutes)
    monkeypatch.setenv("XTOKEN_BENCH_DIR", str(tmp_path / "file"))
    (tmp_path / "file").write_text("")
    assert main(["bench", "--suite", "scaling"]) == 2
    assert capsys.readouterr() == ("", f"xtoken bench: error: XTOKEN_BENCH_DIR={tmp_path / 'file'} is not a folder "
                                       "(the plots go there)\n")


def test_paths_with_a_tilde_memory_errors_and_file_modes(capsys, monkeypatch, tmp_path):
    """`--output=~/w.safetensors` (the shell leaves it alone) was refused ("the folder ~ does not exist"), and
    teacher-cache wrote a folder named "~" in the working directory; a size that does not fit in memory ended in a
    numpy traceback; W files and cache shards were written 0600 (safetensors' own temp file), unreadable to the
    group of a shared cache."""
    import os
    import stat

    import xtoken_ext.cli as cli

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o022)
    try:
        assert main(["build", "offline:gpt2", "offline:gpt2", "--no-cache", "--output=~/w.safetensors"]) == 0
        assert stat.S_IMODE(os.stat(tmp_path / "w.safetensors").st_mode) == 0o644
        assert main(["inspect", "~/w.safetensors", "--id", "3"]) == 0 and not (tmp_path / "~").exists()
    finally:
        os.umask(old)
    capsys.readouterr()

    def too_big(args):
        raise MemoryError("Unable to allocate 32.0 GiB for an array")

    monkeypatch.setattr(cli, "_audit", too_big)  # build_parser binds it when main runs
    assert main(["audit", "offline:gpt2", "offline:gpt2"]) == 2
    assert capsys.readouterr().err.startswith("xtoken audit: error: Unable to allocate 32.0 GiB")


def test_inspect_refuses_an_empty_token_text(capsys, tmp_path):
    """`inspect --token ""` printed no row and no message."""
    from xtoken_ext.projection import Projection

    Projection.random(5, 7, seed=0).save(tmp_path / "w.safetensors")
    assert main(["inspect", str(tmp_path / "w.safetensors"), "--student", "offline:gpt2", "--token", ""]) == 2
    assert "--token got an empty text" in capsys.readouterr().err
