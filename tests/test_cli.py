"""`xtoken bench` end to end (quick sizes): every suite runs offline and prints its table with a ratio column."""
import re

from xtoken_ext.bench import SUITES
from xtoken_ext.cli import main


def test_bench_quick_runs_every_suite(capsys):
    assert main(["bench", "--quick"]) == 0
    out = capsys.readouterr().out
    for suite in SUITES:
        assert f"=== {suite} ===" in out
        section = out.split(f"=== {suite} ===", 1)[1].split("===", 1)[0]
        assert re.search(r"\d+(\.\d+)?x\b", section), f"{suite}: no ratio column printed"


def test_bench_rejects_unknown_suite(capsys):
    assert main(["bench", "--suite", "nope"]) == 2
    assert "unknown suite" in capsys.readouterr().err
