"""bench.scaling's pieces: the growth-exponent fit and its verdict, the BPE cut behind the W-build series (a valid
tokenizer of exactly n ids), and the plot helper without matplotlib."""
import math
import sys

import pytest

from xtoken_ext.bench import save_figure, scaling


@pytest.mark.parametrize("b", [0.0, 0.5, 1.0, 1.3, 2.0, -0.7])
def test_exponent_recovers_a_power_law(b):
    xs = [128, 256, 512, 1024, 3000]
    assert scaling.exponent(xs, [3.7 * x ** b for x in xs]) == pytest.approx(b, abs=1e-9)


def test_exponent_needs_two_points():
    assert math.isnan(scaling.exponent([5], [1.0]))


@pytest.mark.parametrize("b, word", [(1.0, "linear"), (0.85, "linear"), (1.15, "linear"), (0.84, "sublinear"),
                                     (1.16, "superlinear"), (0.1, "constant"), (-0.1, "constant"),
                                     (-0.5, "decreasing"), (float("nan"), "n/a")])
def test_verdict(b, word):
    assert scaling.verdict(b) == word


def test_fits_leave_out_memory_below_resolution():
    points = [{"x": x, "seconds": 1e-3 * x, "peak_extra_bytes": m} for x, m in
              ((1, 4096), (2, 2 * 2**20), (4, 4 * 2**20), (8, 8 * 2**20))]
    f = scaling._fits(points)
    assert f["seconds"][0] == pytest.approx(1.0) and f["seconds"][2] == pytest.approx(8.0)
    assert f["peak_extra_bytes"][0] == pytest.approx(1.0) and f["peak_extra_bytes"][2] == pytest.approx(4.0)


def test_bpe_cut_is_a_valid_tokenizer_of_n_ids():
    from xtoken_ext.testing import offline_tokenizer

    full = offline_tokenizer("gpt2")
    cutter = scaling._BPECutter(full)
    text = "Cross-tokenizer distillation, 12345 tokens: naïve café ☃\n  indented"
    for n in (300, 5_000):
        tok = cutter.cut(n)
        assert len(tok) == n
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert max(ids) < n and tok.decode(ids) == text  # byte-level: every text survives the cut
    assert len(cutter.cut(len(cutter))(text)["input_ids"]) == len(full(text)["input_ids"])  # uncut: same tokens


def test_save_figure_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("XTOKEN_BENCH_DIR", str(tmp_path))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    assert save_figure("x", lambda fig: None) is None
    assert "x.png skipped: matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "x.png").exists()
