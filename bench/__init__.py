"""Microbenchmarks behind `xtoken bench`: each suite prints tables measured side by side in one run
(our fast path vs the pure reference and vs the way the peers do it). Installed as `xtoken_ext.bench`.

SUITES run by default; CHECKS only when named (`xtoken bench --suite gpu`): pass/fail checks whose
``run(quick, dry)`` returns True when everything passed (the command then exits 0, else 1).

Suites that also draw a plot (linear_head, scaling) write it as a PNG into ``$XTOKEN_BENCH_DIR`` (default
``./xtoken-bench``) and print its path; without matplotlib (the ``bench`` extra) they print a note and skip the
plot only."""
import os
from pathlib import Path

SUITES = ("align", "projection", "losses", "costmodel", "linear_head", "scaling")
CHECKS = ("gpu",)


def save_figure(name: str, draw, size=(10.0, 4.0)) -> Path | None:
    """``draw(fig)`` on a new matplotlib Figure, saved as ``<XTOKEN_BENCH_DIR or ./xtoken-bench>/<name>.png``."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    except ImportError:
        print(f"(plot {name}.png skipped: matplotlib is not installed; pip install 'xtoken_ext[bench]')")
        return None
    fig = Figure(figsize=size, layout="constrained")
    draw(fig)
    out = Path(os.environ.get("XTOKEN_BENCH_DIR") or "xtoken-bench")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.savefig(path, dpi=110)
    print(f"plot written to {path.resolve()}")
    return path
