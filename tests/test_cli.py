"""`xtoken bench` end to end (quick sizes): every suite runs offline and prints its table with a ratio column; the
suites that plot write their PNG into $XTOKEN_BENCH_DIR (or say that matplotlib is missing)."""
import importlib.util
import re

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
    assert main(["bench", "--suite", "nope"]) == 2
    assert "unknown suite" in capsys.readouterr().err


def test_build_checks_the_output_path_before_building_w(capsys, monkeypatch, tmp_path):
    """A W for large vocabularies takes minutes: a folder or a path in a missing folder fails first, not after."""
    import xtoken_ext.cli as cli

    def never(args):
        raise AssertionError("W was built before the output path was checked")

    monkeypatch.setattr(cli, "_projection", never)
    for out, msg in ((tmp_path, "is a directory"), (tmp_path / "no" / "w.safetensors", "does not exist")):
        assert main(["build", "offline:gpt2", "offline:gpt2", "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("xtoken build: error: ") and msg in err, err
