"""The cost model (`xtoken bench --suite costmodel`, bench/costmodel.py) on a small W: its byte counts follow the
kernels' pass structure, the teacher loop and residual blocks are the kernel's own, and the simulation of the P-KL chunk
protocol behind its working set keeps its books and shows helping with the D slices shortening the scratch rows'
life."""
from __future__ import annotations

import math

import pytest
import torch

from xtoken_ext import losses as L
from xtoken_ext.bench import costmodel
from xtoken_ext.ops.pkl_kernel import _w_structure
from xtoken_ext.projection import Projection


@pytest.fixture(scope="module")
def proj():
    return Projection.random(3000, 3500, seed=1, empty_rows=0.01)


def test_pkl_model_counts(proj):
    cfg = dict(BLOCK_S=256, BLOCK_T=256, BLOCK_E=512, SLICE=2)
    m = costmodel.pkl_model(proj, rows=64, cfg=cfg)
    V_S, V_T = 3000, 3500
    assert m["floor"] == 2 * (2 * V_S + V_T) and m["hbm_l2"] == 2 * (3 * V_S + V_T)
    w = _w_structure(proj.indices.to(torch.int32).contiguous(), V_T, 256, 512)  # the kernel's own structure
    st = m["stats"]
    assert (st["K"], st["P"], st["res"], st["pieces"]) == (w["cslots"], w["rpiece"], w["n_pieces"] * w["rpiece"],
                                                         w["n_pieces"])
    assert m["loops"][f"R + C ({st['r_blocks']} residual blocks of {st['P']}-entry pieces, {st['tiles']} tiles of a "
                      f"{st['K']}-slot column ELL)"] == math.ceil(st["res"] / 512) + math.ceil(V_T / 256)
    assert m["vocab_tiles"] == math.ceil(V_S / 256) + math.ceil(V_T / 256)
    assert m["slices"] == math.ceil(math.ceil(V_S / 256) / 2) == 6
    assert m["footprint"] < m["footprint_alone"]
    # D's tiles per ELL width run: a slice (2 tiles of 256 ids) runs its widest student's slots, from the kernel's
    # own slot counts; here the slices over ids [512, 1536) are made one-slot
    idx = proj.indices.clone()
    used = idx[512:1536] >= 0
    idx[512:1536][used & (used.cumsum(1) > 1)] = -1
    w = torch.where(idx >= 0, proj.weights, 0.0)
    one = Projection(idx, w / w.sum(1, keepdim=True).clamp_min(1e-30), V_T)  # rows renormalized
    nslot = _w_structure(idx.to(torch.int32).contiguous(), V_T, 256, 512)["nslot"]
    widest = [int(nslot[i:i + 512].max()) for i in range(0, V_S, 512)]
    assert widest[1:3] == [1, 1] and min(widest[:1] + widest[3:]) > 1
    tiles = costmodel.pkl_model(one, rows=64, cfg=cfg)["stats"]["d_tiles"]
    assert tiles == {k: 2 * widest.count(k) for k in range(1, 5)} and sum(tiles.values()) == math.ceil(V_S / 256)
    assert tiles[1] == st["d_tiles"][1] + 4


def test_simulated_live_rows():
    """The protocol simulation's bookkeeping: without jitter or helping every chunk's z row lives a/2 + c and its
    scratch row c/2 + d of each program's a + c + d; helping with 4 slices per chunk shortens the scratch rows' life
    but leaves the z rows'."""
    a, c, d = 2.0, 3.0, 5.0
    for n_prog in (1, 7):
        z, h = costmodel.simulate_live_rows(n_prog, 70, a, c, d, 4, help_others=False, jitter=0.0)
        assert z == pytest.approx(n_prog * (a / 2 + c) / (a + c + d))
        assert h == pytest.approx(n_prog * (c / 2 + d) / (a + c + d))
    z_help, h_help = costmodel.simulate_live_rows(132, 4000, a, c, d, 4)
    z_alone, h_alone = costmodel.simulate_live_rows(132, 4000, a, c, d, 4, help_others=False)
    assert h_help < 0.85 * h_alone and z_help == pytest.approx(z_alone, rel=0.02)


@pytest.mark.parametrize("uncovered,topk", [("renormalize", 8192), ("epsilon", 8192), ("renormalize", 64)])
def test_hkl_model_counts(proj, uncovered, topk):
    """H-KL's m is the one the op computes (min(|U_S|, |U_T|, uncommon_topk) over the allowed pairs), its sort runs
    in the small network when m fits it, for the ⌈log₂ n⌉ merge stages that sort n lanes (the whole lists where both
    fit it too, else a window of m), and the time-averaged working set is below every per-program buffer held all
    the time."""
    from xtoken_ext.ops import hkl_kernel as H

    m = costmodel.hkl_model(proj, rows=64, uncovered=uncovered, topk=topk)
    st = m["stats"]
    allowed = proj.covered_columns() if uncovered == "renormalize" else torch.ones(3500, dtype=torch.bool)
    cs, ct = proj.common_pairs("relaxed")
    keep = allowed[ct.long()]
    u_s, u_t = 3000 - torch.unique(cs[keep]).numel(), int(allowed.sum()) - torch.unique(ct[keep]).numel()
    assert (st["u_s"], st["u_t"], st["m"]) == (u_s, u_t, min(u_s, u_t, topk))
    # the op's bound: its cap as the loss hands it (losses._uncommon_cap)
    w_big, w_small = H.sort_widths(min(3000, topk, max(min(u_s, u_t), L._CAP_FLOOR)))
    assert st["w_net"] == (w_small if st["m"] <= w_small else w_big)
    whole = st["w_net"] < w_big and max(st["l_a"], st["l_b"]) <= w_small
    lg = math.ceil(math.log2(max(st["l_a"], st["l_b"]) if whole else min(st["m"], st["w_net"])))
    sorts = 1 if st["w_net"] < w_big else 2  # the small network sorts both windows side by side
    how = "both lists sorted whole" if whole else "3 + 3 passes per list"
    assert f"window ({how} + {sorts} x {lg * (lg + 1) // 2} sort stages)" in m["loops"]
    touched = min(st["m"], st["w_net"])
    held = 64 * (8 * st["l_a"] + 4 * st["l_b"] + 24 * touched + 8 * st["m"] + 2 * 3500 + costmodel.SCRATCH_FIXED)
    shared = 4 * 3000 + 5 * 3500
    assert shared + 64 * costmodel.SCRATCH_FIXED < m["footprint"] < shared + 0.97 * held  # held all the time: = held
    assert m["hbm_l2"] == 2 * (3 * 3000 + 3500) and m["t_row"] > m["t_window"] > m["t_sort"] > 0


def test_report_prints_both_kernels(proj, capsys):
    costmodel.report([("random", costmodel.pkl_model(proj, 64)), ("random", costmodel.hkl_model(proj, 64))])
    out = capsys.readouterr().out
    assert "P-KL | random" in out and "H-KL | random" in out and "D slices per chunk" in out


def test_calibrated_pkl_time(proj, capsys, monkeypatch):
    """P-KL's calibrated line: its L2<->SM bytes counted per warp instruction at the measured L2_WARP rate, or its
    modelled time where that is longer (here both ways, by moving the rate), and the same with one element a thread
    in C's and D's gathers at the LANE1 config's own instruction counts (here made up: C and D issue-bound, LANE1's
    3x the default's); H-KL has none."""
    k4 = ("1", "2", "3", "4")
    c, d = {k: 400 + 60 * int(k) for k in k4}, {k: 150 + 90 * int(k) for k in k4}
    lane1 = {n: {k: 3 * v for k, v in x.items()} for n, x in (("C", c), ("D", d))}
    sfu = dict(A=9, C={k: 24 for k in k4}, R={k: 16 for k in ("1", "2", "4")}, D={k: 16 for k in k4})
    issue = dict(warps=8, A=140, C=c, R={"1": 900, "2": 650, "4": 410}, D=d, sfu=sfu,
                 LANE1=dict(lane1, sfu=dict(C=sfu["C"], D=sfu["D"])))
    m = costmodel.pkl_model(proj, 64, issue=issue)
    gpu = costmodel.GPU
    t_issue = 8192 / gpu["sms"] * m["t_row"]
    assert m["t_row1"] > 1.5 * m["t_row"]
    for rate in (costmodel.L2_WARP, 8192 * m["l2_warp"] / t_issue * 4):  # gathers longer, then the modelled time
        monkeypatch.setattr(costmodel, "L2_WARP", rate)
        costmodel.report([("random", m), ("random", costmodel.hkl_model(proj, 64))])
        lines = [x for x in capsys.readouterr().out.splitlines() if "calibrated" in x]
        want, want1 = (max(8192 * m[k] / rate, 8192 / gpu["sms"] * m[t]) for k, t in (("l2_warp", "t_row"),
                                                                                        ("l2_warp1", "t_row1")))
        assert len(lines) == 1 and f": {want * 1e3:.2f} ms (" in lines[0], (lines, want)
        floor = 8192 * m["floor"] / gpu["hbm"]
        assert lines[0].endswith(f"instruction counts {8192 / gpu['sms'] * m['t_row1'] * 1e3:.2f} ms): "
                                 f"{want1 * 1e3:.2f} ms ({want1 / floor:.1f}x)"), lines


def test_warp_sectors_by_hand():
    """Distinct sectors per warp instruction: 32 adjacent 2-byte values take 2 sectors one a thread and 16 with the
    lanes 8 apart (each 256-element chunk: 8 instructions over 512 bytes); 4-byte values twice that; masked lanes
    none; one address in all lanes one."""
    seq = torch.arange(256)
    assert costmodel.warp_sectors(seq, 1, 2).tolist() == [2] * 8
    assert costmodel.warp_sectors(seq, 8, 2).tolist() == [16] * 8
    assert costmodel.warp_sectors(seq, 8, 4).tolist() == [32] * 8
    assert costmodel.warp_sectors(seq, 1, 4).tolist() == [4] * 8
    assert costmodel.warp_sectors(torch.full((256,), -1), 8, 2).tolist() == [0] * 8
    assert costmodel.warp_sectors(torch.zeros(64, dtype=torch.long), 2, 2).tolist() == [1, 1]
    assert costmodel.warp_sectors(torch.arange(40), 1, 2).tolist() == [2, 1]  # a partial last instruction


def test_pkl_gathers_per_warp_instruction():
    """The gathers' bytes per warp instruction on a W whose counts follow by hand: student s -> teacher column s
    (one-to-one, V 4,096, blocks of 2,048): C gathers z (2 B) at adjacent students, D gathers h (4 B) at adjacent
    ranks, which start at 1 (h[0] is the spare); with one element a thread 2 + 5 sectors per 32 ids (32 ranks from
    32i + 1 straddle 5), in Triton's layout (8 a thread, lanes 8 apart) 16 + 32. R has no entries. The per-warp
    figure replaces the upper one's sector per gathered value."""
    V = 4096
    idx = torch.full((V, 4), -1, dtype=torch.long)
    idx[:, 0] = torch.arange(V)
    one = Projection(idx, (idx >= 0).float(), V)
    cfg = dict(BLOCK_S=2048, BLOCK_T=2048, BLOCK_E=4096, SLICE=2)
    m = costmodel.pkl_model(one, rows=64, cfg=cfg)
    st = m["stats"]
    assert (st["K"], st["res"]) == (1, 0)
    assert st["warp1"] == dict(C=32 * 2 * V // 32, R=0, D=32 * 5 * V // 32)
    assert st["warp"] == dict(C=32 * 16 * V // 32, R=0, D=32 * 32 * V // 32)
    assert m["l2_warp"] == m["l2"] - 2 * 32 * V + sum(st["warp"].values()) and m["l2_warp1"] < m["l2_warp"] < m["l2"]


def test_pkl_d_gathers_at_the_kernels_keys():
    """D's gathers at the kernel's own ELL keys (ops.pkl_kernel._w_structure): the columns longer than the column ELL
    ranked first, then a spare, then the others. Student s -> teacher column s + 6, and students 0..599 also ->
    column s mod 6, so columns 0..5 hold 101 entries (past the 1-slot column ELL: ranks 1..6, spare 7) and c ≥ 6 has
    rank c + 2: student s's first key is s + 8, a multiple of 8 at every 32nd student, so 32 adjacent students'
    fp32 h values take 4 sectors (ranks counted from 1 over all columns would straddle 5). One element a thread: 4
    sectors per slot-0 instruction, 1 per slot-1 one (keys ≤ 6 or the h[0] of no slot), 128 instructions each (the
    slice of 2 tiles runs 2 slots); lanes 8 apart: 32 and 1. C one element a thread: 32 columns' first students
    straddle 2 sectors (the first 32), 3 (the others up to 4,095), 2 (4,096..4,127: the last students and the padding's
    student 0), 1 (padding)."""
    V = 4096
    idx = torch.full((V, 4), -1, dtype=torch.long)
    idx[:, 0] = torch.arange(V) + 6
    idx[:600, 1] = torch.arange(600) % 6
    proj = Projection(idx, torch.where(idx >= 0, 1.0, 0.0) / (idx >= 0).sum(1, keepdim=True), V + 6)
    st = costmodel.pkl_model(proj, rows=64, cfg=dict(BLOCK_S=2048, BLOCK_T=2048, BLOCK_E=4096, SLICE=2))["stats"]
    assert (st["K"], st["n_long"], st["d_tiles"]) == (1, 6, {1: 0, 2: 2, 3: 0, 4: 0})
    assert st["warp1"]["D"] == 32 * (4 + 1) * 128 and st["warp"]["D"] == 32 * (32 + 1) * 128
    assert st["warp1"]["C"] == 32 * (2 + 127 * 3 + 2 + 63)


def test_uld_model_merge_sorts_both_lists():
    """ULD (no common pairs, m uncapped) past the largest sort network: the model sorts both whole lists (no
    selection pass over them): per list ⌈|L|/W⌉ blocks in the 8,192-lane network (91 stages each) and ⌈log₂ blocks⌉
    merge rounds of as many tiles of 13 steps, all in one chain; a capped m (8,192) takes the one window."""
    from xtoken_ext.ops import hkl_kernel as H

    proj = Projection.random(20_000, 18_000, seed=0)
    capped = costmodel.hkl_model(proj, 64, loss="ULD", topk=8192)
    full = costmodel.hkl_model(proj, 64, loss="ULD", topk=None)
    st = full["stats"]
    assert st["nnz"] == 0 and st["u_s"] == 20_000 and st["m"] == min(20_000, st["u_t"]) > 2 * 8192
    block = H._CONFIGS[0].kwargs["BLOCK_L"]
    blocks, merges = [], []  # per list: block sorts' stages, merge tiles' steps
    for n in (st["l_a"], st["l_b"]):
        k = math.ceil(n / 8192)
        blocks.append(k * 91)
        merges.append(math.ceil(math.log2(k)) * k * 13)
    assert (st["l_a"], st["l_b"]) == (20_000, st["u_t"]) and min(merges) > 0  # several blocks and rounds
    assert full["chains"][block][0] == sum(blocks) + sum(merges)
    lanes = 8192 / 32 / costmodel.ISSUE / costmodel.CLOCK
    assert full["t_sort"] == pytest.approx(sum(f * b + g * m for f, g, b, m in zip(
        costmodel.SORT_INSTR, costmodel.MERGE_INSTR, blocks, merges)) * lanes)
    assert full["t_lists"] == 0 and capped["t_lists"] == 0  # no issue counts given
    assert "3 + 3 passes per list + 2 x 91 sort stages" in " ".join(capped["loops"])
    assert "merge-sorted" in " ".join(full["loops"])


def test_issue_from_sass(proj):
    """bench.sass reads each streaming pass's loop out of the kernels' sm_90 SASS (compiled offline, in a
    subprocess), named by the source line of its backward branch: every pass is found once (D once per ELL width
    it is instantiated for), and the model times each pass as the longest of its HBM stream, its issue and its SFU
    time (MUFU instructions, as many as the math's transcendentals)."""
    from xtoken_ext.bench import sass
    from xtoken_ext.ops import hkl_kernel as H
    from xtoken_ext.ops import pkl_kernel as P

    lines = sass.header_lines(P._slice_rows, "for v0 in range(v_lo")
    assert len(lines) == 1 and {f for f, _ in lines} == {"pkl_kernel.py"}
    iss = costmodel.issue_counts()
    assert iss is not None
    p, h = iss["P-KL"], iss["H-KL"]
    assert (p["warps"], h["warps"]) == (P._CONFIGS[0].num_warps, H._CONFIGS[0].num_warps)
    c = [p["C"][str(k)] for k in range(1, P.SLOTS + 1)]
    d = [p["D"][str(k)] for k in range(1, P.SLOTS + 1)]
    r = [p["R"][str(k)] for k in P.ENTRY_COST]
    assert all(100 < x < 20_000 for x in [p["A"], *r, *d, *c, h["S1"], h["T1"], h["S3"]])
    assert r == sorted(r, reverse=True)  # R: longer pieces, fewer scan steps per entry
    # the window's passes over each list: the instantiations that load that list's keys (bench.sass.pass_bodies)
    assert sorted(h["L"]) == ["a", "b"] and all(sorted(v) == ["b1", "gather", "hist", "select"] and
                                                all(100 < x < 1_000 for x in v.values()) for v in h["L"].values())
    assert c == sorted(set(c)) and c[0] > p["A"] and h["T1"] > h["S3"]  # each column-ELL slot adds gathers
    # so does each ELL slot of D: per student lane at least its word's load, weight and address, the gather of h,
    # exp2's argument and MUFU, and the sum (8 instructions; 11 in the SASS)
    per_s = P._CONFIGS[0].kwargs["BLOCK_S"] // (32 * p["warps"])
    assert len(set(d)) == P.SLOTS and d[-1] - d[0] >= 8 * per_s * (P.SLOTS - 1)
    # the per-column-slot and per-residual-entry costs by which the kernel picks the column ELL's width K
    lanes = 32 * p["warps"]
    assert abs((c[-1] - c[0]) / (P.SLOTS - 1) / (P.TILES_GPU["BLOCK_T"] / lanes) - P.SLOT_COST) < 1
    assert all(abs(p["R"][str(k)] / (P.TILES_GPU["BLOCK_E"] / lanes) - v) < 1 for k, v in P.ENTRY_COST.items())
    # the SFU's MUFU instructions are the math's transcendentals, per lane (a thread holds BLOCK / lanes of a tile)
    # and one per tile for the running max's rescale: A exp(x/τ − m); C per column e = exp(x̄ − m), log(q + eps) (u =
    # x̄ − log(q + eps) is the column's h) and p = exp2 per column-ELL slot; R p per entry; D p per student and h =
    # exp2(u log₂e − β) per ELL slot; H-KL S1 / T1 the row's exp, S3 the student's p and the teacher's P at a common
    # column
    f, per_t = p["sfu"], P.TILES_GPU["BLOCK_T"] // lanes
    assert f["C"] == {str(k): per_t * (2 + k) + 1 for k in range(1, P.SLOTS + 1)}
    assert (f["A"], f["D"]) == (per_s + 1, {str(k): per_s * (1 + k) for k in range(1, P.SLOTS + 1)})
    assert f["R"] == {str(k): P.TILES_GPU["BLOCK_E"] // lanes for k in P.ENTRY_COST}
    hs, ht = (H._CONFIGS[0].kwargs[k] // (32 * h["warps"]) for k in ("BLOCK_S", "BLOCK_T"))
    assert h["sfu"] == dict(S1=hs + 1, T1=ht + 1, S3=2 * hs)
    m = costmodel.pkl_model(proj, 64, issue=p)
    st = m["stats"]
    assert m["passes"]["C"] == (2 * 3500 / (costmodel.GPU["hbm"] / costmodel.GPU["sms"]),
                                costmodel.issue_time(p["C"][str(st["K"])], p["warps"], st["tiles"])
                                + costmodel.issue_time(p["R"][str(st["P"])], p["warps"], st["r_blocks"]),
                                costmodel.sfu_time(f["C"][str(st["K"])], p["warps"], st["tiles"])
                                + costmodel.sfu_time(f["R"][str(st["P"])], p["warps"], st["r_blocks"]))
    assert costmodel.sfu_time(1, 1, 1) == 8 * costmodel.issue_time(1, 1, 1)  # 32 lanes at 16 per clock vs 4 warps
    assert m["t_row"] == sum(max(a, b, c) for a, b, c in m["passes"].values())
    # the LANE1 config (ops.pkl_kernel._gather): C's and D's gathers one element a thread, the offsets and values
    # moved between layouts through shared memory: more instructions per slot, the same MUFU
    l1 = p["LANE1"]
    c1, d1 = ([x[str(k)] for k in range(1, P.SLOTS + 1)] for x in (l1["C"], l1["D"]))
    assert all(a < b < 2 * a for a, b in zip(c + d, c1 + d1)) and l1["sfu"] == dict(C=f["C"], D=f["D"]), l1
    assert m["t_row1"] > m["t_row"]
    assert m["t_sfu"] == sum(max(a, c) for a, _, c in m["passes"].values()) < m["t_row"]
    mh = costmodel.hkl_model(proj, 64, issue=h)
    assert mh["t_row"] == pytest.approx(sum(max(a, b, c) for a, b, c in mh["passes"].values()) + mh["t_window"])
    # the window's list passes at m = 4,096 (lists of 7,891 / 5,891 keys: 4 / 3 tiles): three over each list
    # (level-1 histogram, bin b1's key range and copy, gather), the bisection's ~3 over bin b1's copied keys
    # (B1_SHARE of m: one tile)
    mh = costmodel.hkl_model(Projection.random(20_000, 18_000, seed=0), 64, uncovered="epsilon", topk=4096, issue=h)
    st, block = mh["stats"], H._CONFIGS[0].kwargs["BLOCK_L"]
    assert (st["m"], st["w_net"], st["l_a"], st["l_b"]) == (4096, 4096, 7891, 5891)
    assert math.ceil(costmodel.B1_SHARE * 4096) <= block
    assert mh["t_lists"] == pytest.approx(sum(
        costmodel.issue_time(L["hist"] + L["b1"] + L["gather"], h["warps"], math.ceil(n / block))
        + costmodel.issue_time(costmodel.SELECT_STEPS * L["select"], h["warps"], 1)
        for n, L in ((st["l_a"], h["L"]["a"]), (st["l_b"], h["L"]["b"]))))
    # a miss, priced on the sides the hint serves: at m = 1,024 the student's 7,891 uncommon ids exceed 2 m + 4,096
    # (hinted), the teacher's 5,891 do not (listed whole); rescued (_rescue's count and append, cheaper than
    # _compact's level-1 histogram and compaction), or not (the count, then _compact), at RESCUE_RATE of the misses
    assert sorted(h["miss"]) == ["a", "b"] and all(sorted(v) == ["append", "count", "gather", "hist"] and all(
        h["S3"] < x < 5_000 for x in v.values()) and v["count"] + v["append"] < v["hist"] + v["gather"]
        for v in h["miss"].values())
    mh = costmodel.hkl_model(Projection.random(20_000, 18_000, seed=0), 64, uncovered="epsilon", topk=1024, issue=h)
    M = h["miss"]["a"]

    def t(*n):
        return costmodel.issue_time(sum(M[k] for k in n), h["warps"], math.ceil(20_000 / block))

    assert list(mh["t_miss"]) == ["a"] and mh["t_miss"]["a"] == dict(
        rescued=t("count") + t("append"), exact=t("count") + t("hist", "gather"), before=t("hist", "gather"))
    hit, res = costmodel.HIT_RATE[0], costmodel.RESCUE_RATE[0]
    assert mh["t_expect"] == pytest.approx(mh["t_row"] + (1 - hit) * (
        res * mh["t_miss"]["a"]["rescued"] + (1 - res) * mh["t_miss"]["a"]["exact"]))
    assert mh["t_before"] == pytest.approx(mh["t_row"] + (1 - hit) * mh["t_miss"]["a"]["before"])


def test_hkl_model_whole_lists():
    """A W pairing all but 100 student and 150 teacher ids one to one (uncovered="epsilon": every teacher column
    allowed): m = 100, and both uncommon sets (the lists) fit the small network, which sorts them whole (the
    ⌈log₂ 150⌉ = 8 merge stages that sort 256 lanes, no pass over the lists)."""
    from xtoken_ext.projection import Projection

    idx = torch.full((3000, 4), -1, dtype=torch.int32)
    idx[:2900, 0] = torch.arange(2900, dtype=torch.int32)
    proj = Projection(idx, (idx >= 0).float(), 3050)
    m = costmodel.hkl_model(proj, rows=64, uncovered="epsilon", issue=costmodel.issue_counts()["H-KL"])
    st = m["stats"]
    assert (st["m"], st["l_a"], st["l_b"], st["w_net"]) == (100, 100, 150, 1024)
    assert "window (both lists sorted whole + 1 x 36 sort stages)" in m["loops"]
    assert m["t_lists"] == 0 and m["chains"][2048][0] == 36
    # S3's 2,900 teacher gathers, one sector each or the distinct ones per 2,048-student tile: columns 0..2,047
    # (128 sectors of 16 bf16) and 2,048..2,899 (sectors 128..181)
    assert costmodel.common_sectors(proj, "relaxed", "epsilon", 2048) == 128 + 54
    assert m["l2"] - m["l2_lo"] == costmodel.SECTOR * (2900 - 182)
