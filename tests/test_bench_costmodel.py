"""The cost model (`xtoken bench --suite costmodel`, bench/costmodel.py) on a small W: its byte counts follow the
kernels' pass structure, the W-tile loop is the kernel's own tile count, and helping with the D slices shrinks the
P-KL working set by the share of D it takes off each chunk's scratch-row lifetime."""
from __future__ import annotations

import math

import pytest
import torch

from xtoken_ext.bench import costmodel
from xtoken_ext.ops.pkl_kernel import column_tiles
from xtoken_ext.projection import Projection


@pytest.fixture(scope="module")
def proj():
    return Projection.random(3000, 3500, seed=1, empty_rows=0.01)


def test_pkl_model_counts(proj):
    cfg = dict(BLOCK_S=256, BLOCK_T=256, BLOCK_E=512, SLICE=2)
    m = costmodel.pkl_model(proj, rows=64, cfg=cfg)
    V_S, V_T = 3000, 3500
    assert m["floor"] == 2 * (2 * V_S + V_T) and m["hbm_l2"] == 2 * (3 * V_S + V_T)
    idx = proj.indices
    col_len = torch.bincount(idx[idx >= 0].long(), minlength=V_T)
    tiles = column_tiles(torch.cat([col_len.new_zeros(1), col_len.cumsum(0)]), 256, 512)
    assert m["loops"][f"C (W tiles, {m['stats']['entry_only']} entry-only)"] == tiles.shape[0] - 1
    assert m["vocab_tiles"] == math.ceil(V_S / 256) + math.ceil(V_T / 256)
    assert m["slices"] == math.ceil(math.ceil(V_S / 256) / 2) == 6
    # working set: W + programs x (z row share + h row share); helping takes D·(1 − 1/G) off the h share
    t_a, t_c, t_d = 2 * V_S, 2 * V_T, 4 * V_S
    h_row = 4 * (V_T + m["stats"]["tiles"])
    nprog = 64
    gain = nprog * h_row * (t_d - t_d / 6) / (t_a + t_c + t_d)
    assert m["footprint_alone"] - m["footprint"] == pytest.approx(gain)
    one = costmodel.pkl_model(proj, rows=64, cfg=dict(cfg, SLICE=100))
    assert one["slices"] == 1 and one["footprint"] == pytest.approx(one["footprint_alone"])


def test_report_prints_both_kernels(proj, capsys):
    costmodel.report([("random", costmodel.pkl_model(proj, 64)), ("random", costmodel.hkl_model(proj, 64))])
    out = capsys.readouterr().out
    assert "P-KL | random" in out and "H-KL | random" in out and "D slices per chunk" in out
