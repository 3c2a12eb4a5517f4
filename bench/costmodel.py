"""Cost model of the fused Triton loss kernels, checkable without a GPU: for a given W and shape it counts, per
logit row (a 1-to-1 chunk, the common case), the bytes each kernel moves from HBM, the bytes it moves between L2 and
the SMs, and the longest dependent loop, beside the HBM floor (read the student and teacher rows, write the
gradient row once). Nothing here is timed; the GPU numbers come from ``xtoken bench --suite gpu`` on a GPU.

HBM bytes are counted twice: with the per-program fp32 scratch row (h, V_T floats) held in L2 (its footprint, all
programs together, is printed beside L2's size) and with every scratch access going to HBM (the bound when it does
not fit). W-derived arrays (entry lists, ELL, a, masks) are shared by all programs and read from L2. L2<->SM bytes
count one 32-byte sector per gathered element (an upper bound: gathers that hit L1 cost less).
"""
from __future__ import annotations

import math

import torch

# Nominal H100 SXM figures: HBM3 bandwidth, L2 size, SMs. The model needs only their ratios to the bytes.
GPU = dict(name="H100 SXM", hbm=3.35e12, l2=50 << 20, sms=132)
CONFIG = dict(BLOCK_S=4096, BLOCK_T=2048, BLOCK_E=2048)  # an autotune config of ops.pkl_kernel
SECTOR = 32  # bytes an L2 request moves for one gathered element


def w_stats(proj, block_t: int, block_e: int) -> dict:
    """nnz, active ELL slots, per-BLOCK_T-tile entry counts of W, and the old kernel's ragged-loop length
    (Σ over BLOCK_T=512 tiles of the longest column)."""
    idx = proj.indices
    V_T = proj.teacher_vocab_size
    cols = idx[idx >= 0].long()
    col_len = torch.bincount(cols, minlength=V_T)
    tile_e = torch.zeros(math.ceil(V_T / block_t), dtype=torch.int64).index_add_(
        0, torch.arange(V_T) // block_t, col_len)
    padded = torch.cat([col_len, col_len.new_zeros(-V_T % 512)])
    old = padded.view(-1, 512).amax(1).sum()
    return dict(nnz=cols.numel(), max_col=int(col_len.max()), entry_iters=int(((tile_e + block_e - 1) // block_e).sum()),
                old_loop=int(old))


def pkl_model(proj, rows: int, elem: int = 2, cfg: dict = CONFIG, gpu: dict = GPU) -> dict:
    """Per-row model of ``_pkl_kernel`` (dense teacher, frozen W) for a 1-to-1 chunk."""
    V_S, V_T = proj.student_vocab_size, proj.teacher_vocab_size
    st = w_stats(proj, cfg["BLOCK_T"], cfg["BLOCK_E"])
    floor = elem * (2 * V_S + V_T)
    stream = elem * (3 * V_S + V_T)  # z in A and D, t in C2, dz in D
    scratch = 4 * V_T + min(4 * V_T, SECTOR * st["nnz"])  # h_u written in C2, gathered in D (≤ the whole row)
    l2 = (4 * V_S  # a in A
          + st["nnz"] * (12 + SECTOR) + 4 * (V_T // cfg["BLOCK_T"] + 1)  # C1: entries, p gathers, col_ptr
          + V_T * (1 + 8)  # C2: mask, Qu written and read back
          + V_S * 32 + st["nnz"] * SECTOR  # D: ELL [V_S, 4] int32 + fp32, h gathers (tile maxima: L1)
          + scratch)
    tiles_s, tiles_t = math.ceil(V_S / cfg["BLOCK_S"]), math.ceil(V_T / cfg["BLOCK_T"])
    loops = {"A (student LSE)": tiles_s, "C (teacher tiles + Qu entry tiles)": tiles_t + st["entry_iters"],
             "D (gradient)": tiles_s}
    nprog = min(rows, 2 * gpu["sms"])
    return dict(kernel="P-KL", floor=floor, hbm_l2=stream, hbm_spill=stream + scratch, l2=l2, loops=loops,
                vocab_tiles=tiles_s + tiles_t + math.ceil(st["nnz"] / cfg["BLOCK_E"]), old_loop=st["old_loop"],
                footprint=nprog * 4 * V_T + st["nnz"] * 12 + V_S * 36 + V_T * 5, stats=st)


def hkl_model(proj, rows: int, elem: int = 2, m: int = 8192, block: int = 4096, gpu: dict = GPU) -> dict:
    """Per-row model of ``_hkl_kernel`` (dense teacher, H-KL with the relaxed common set, uncommon_topk m) for a
    1-to-1 chunk, from the pass table in ops.hkl_kernel's docstring: student rows read in S1 (LSE, histogram), S2
    (compaction) and S3 (gradient, written), teacher rows in T1 and T2; the candidate lists L_a (8 B) / L_b (4 B)
    written once and read three times, the gradient list G (8 B) written and read, the sort buffers; S3 gathers the
    teacher at the common columns."""
    V_S, V_T = proj.student_vocab_size, proj.teacher_vocab_size
    n_common = int(proj.common_pairs("relaxed")[0].numel())
    floor = elem * (2 * V_S + V_T)
    stream = elem * (4 * V_S + 2 * V_T)
    lists = 4 * 8 * m + 4 * 4 * m + 2 * 8 * m + 12 * min(m, 8192)  # |L| ≈ m per side
    l2 = lists + n_common * SECTOR + m * SECTOR  # common-column gathers (S3), fix-up gathers of the listed columns
    tiles_s, tiles_t = math.ceil(V_S / block), math.ceil(V_T / block)
    w = min(1 << (m - 1).bit_length(), 8192)
    stages = int(0.5 * math.log2(w) * (math.log2(w) + 1))
    loops = {"S1/S2/S3 (student passes)": tiles_s, "T1/T2 (teacher passes)": tiles_t,
             "window (3 list passes + bitonic stages)": 3 * math.ceil(m / block) + stages}
    return dict(kernel="H-KL", floor=floor, hbm_l2=stream, hbm_spill=stream + lists, l2=l2, loops=loops,
                vocab_tiles=tiles_s + tiles_t, old_loop=None,
                footprint=min(rows, 2 * gpu["sms"]) * (12 * 2 * m + 8 * m + 12 * w + (32 << 10)),
                stats=dict(nnz=n_common, max_col=0))


def _fmt_bytes(b: float) -> str:
    return f"{b / 2**20:.2f} MiB"


def report(models: list[tuple[str, dict]], gpu: dict = GPU, rows: int = 8192) -> None:
    print(f"Cost model (no GPU needed), {rows:,} rows, bf16 logits, per 1-to-1 chunk; {gpu['name']}: "
          f"{gpu['hbm'] / 1e12:.2f} TB/s HBM, {gpu['l2'] >> 20} MiB L2; config {CONFIG}")
    head = ("kernel", "W", "floor/row", "HBM/row (scratch in L2)", "x floor", "HBM/row (scratch spilled)", "x floor",
            "L2<->SM/row", "longest loop", "vocab tiles", "old loop")
    print(" | ".join(head))
    for wname, m in models:
        loop_name, loop = max(m["loops"].items(), key=lambda kv: kv[1])
        print(" | ".join((m["kernel"], wname, _fmt_bytes(m["floor"]), _fmt_bytes(m["hbm_l2"]),
                          f"{m['hbm_l2'] / m['floor']:.2f}x", _fmt_bytes(m["hbm_spill"]),
                          f"{m['hbm_spill'] / m['floor']:.2f}x", _fmt_bytes(m["l2"]), f"{loop} ({loop_name})",
                          str(m["vocab_tiles"]), str(m["old_loop"] or "-"))))
        st = m["stats"]
        fits = "fits" if m["footprint"] <= gpu["l2"] else "does NOT fit"
        what = (f"W: nnz {st['nnz']:,}, longest column {st['max_col']}" if m["kernel"] == "P-KL"
                else f"common pairs {st['nnz']:,}, m = 8192")
        print(f"    {what}; scratch + W footprint "
              f"{_fmt_bytes(m['footprint'])} {fits} in L2; floor time at {rows:,} rows "
              f"{rows * m['floor'] / gpu['hbm'] * 1e3:.2f} ms, model {rows * m['hbm_l2'] / gpu['hbm'] * 1e3:.2f}"
              f"–{rows * m['hbm_spill'] / gpu['hbm'] * 1e3:.2f} ms")


def _real_w(quick: bool):
    from xtoken_ext.projection import Projection
    from xtoken_ext.testing import offline_tokenizer

    if quick:
        return "gpt2 x mistral-spm", Projection.from_tokenizers(offline_tokenizer("gpt2"),
                                                                 offline_tokenizer("mistral-spm"), progress=False)
    return "Llama-3 x Qwen3", Projection.from_tokenizers(offline_tokenizer("llama3"), offline_tokenizer("qwen3"),
                                                          128_256, 151_936, progress=False)


def run(quick: bool = False) -> None:
    from xtoken_ext.projection import Projection

    name, real = _real_w(quick)
    rand = Projection.random(real.student_vocab_size, real.teacher_vocab_size, seed=0, empty_rows=0.01)
    report([("Projection.random", pkl_model(rand, 8192)), (name, pkl_model(real, 8192)),
            ("Projection.random", hkl_model(rand, 8192)), (name, hkl_model(real, 8192))])
