"""xt.Distiller / xt.Teacher (xtoken_ext/distill.py) on real offline tokenizers and xt.Collator batches: the
objective equals its composition from the public losses, "auto" follows the audit, a shared tokenizer gives the
plain per-token KL, confidence weights, top-1 agreement, cached teachers, learnable W, teacher dtype/no-grad,
packed batches and errors.

Models are lookup tables (logits = table[ids mod M] · scale) unless a test needs a real transformer. Tolerances:
two fp32 computations of the same per-row quantities that differ in how scalars are rounded and sums ordered;
each value is bounded by C·u·κ relative to the magnitude of its parts (helpers.kappa: the log-sum-exp condition),
a gradient entry by C·u·κ·(|KD part| + |CE part|)."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from tokenizers import normalizers
from helpers import C, kappa

import xtoken_ext as xt
from xtoken_ext.losses import LearnableProjection
from xtoken_ext.distill import (Distiller, Teacher, combine_losses, identity_projection, next_token_ce,
                                weighted_kd)

U32 = 2.0 ** -24
M = 211
TEXTS = ["The year 2024 had 366 days; 12,345 apples cost $3.50 in total.",
         "def area(r):\n    return 3.14159 * r ** 2",
         "Q: what is 12 + 30? A: 42, and 7 pears."]


class Table(torch.nn.Module):
    """logits[b, p] = scale · table[ids[b, p] mod M]; records the dtype and grad mode it ran with."""

    def __init__(self, V: int, seed: int, scale: float = 2.0, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter((scale * torch.randn(M, V, generator=g)).to(dtype))
        self.seen = []

    def forward(self, input_ids, attention_mask=None):
        self.seen.append((self.table.dtype, torch.is_grad_enabled()))
        return self.table[input_ids % M]


@pytest.fixture(scope="module")
def toks(offline_tok):
    return offline_tok("gpt2"), offline_tok("mistral-spm"), offline_tok("qwen3")


@pytest.fixture(scope="module")
def batch(toks):
    s, m, _ = toks
    return xt.Collator(s, [m, s], max_length=32)(TEXTS)


def only(batch, j: int):
    """The batch with teacher j alone."""
    return {**batch, "teachers": [batch["teachers"][j]]}


def student_logits(toks, batch, seed=0):
    table = Table(len(toks[0]), seed)
    return table, table(batch["input_ids"])


def test_objective_equals_its_composition_from_the_public_losses(toks, batch):
    s, m, _ = toks
    t_spm, t_same = Table(len(m), 1, 3.0), Table(len(s), 2, 3.0)
    d = Distiller(s, [Teacher(t_spm, m, weight=0.2, name="spm"), Teacher(t_same, s, weight=0.8, name="same")])
    table, z = student_logits(toks, batch)
    loss, metrics = d(z, batch)
    assert [t.kind for t in d.teachers] == ["pkl", "kl"]  # numerals outside GPT-2's exact common set; same tokenizer
    (g,) = torch.autograd.grad(loss, z)

    z2 = z.detach().requires_grad_()
    tds = batch["teachers"]
    with torch.no_grad():
        zt = [t_spm(tds[0]["input_ids"]), t_same(tds[1]["input_ids"])]
    proj = xt.Projection.from_tokenizers(s, m, len(s), len(m), progress=False)
    kds = [xt.pkl_loss(z2, zt[0], tds[0]["alignment"], proj),
           xt.pkl_loss(z2, zt[1], tds[1]["alignment"], identity_projection(len(s), len(s)))]
    labels = batch["labels"]
    ce = next_token_ce(z2, labels.clamp_min(0), labels != -100)
    kd = weighted_kd(kds, [0.2, 0.8])
    ref, scale = combine_losses(ce, kd)
    g_kd, = torch.autograd.grad(scale * kd, z2, retain_graph=True)
    g_ce, = torch.autograd.grad(ce, z2, retain_graph=True)
    ref, ce, kd, kds = ref.detach(), ce.detach(), kd.detach(), [x.detach() for x in kds]
    kap = kappa(z, torch.cat([x.reshape(-1) for x in zt])[None], 1.0)
    for key, want in (("loss", ref), ("ce", ce), ("kd", kd), ("kd_scale", scale), ("kd/spm", kds[0]),
                      ("kd/same", kds[1])):
        assert abs(float(metrics[key]) - float(want)) <= C * U32 * kap * (abs(float(want)) + 1), key
    assert math.isclose(float(loss.detach()), float(ref), rel_tol=C * U32 * kap)  # dynamic: 2·CE
    bound = C * U32 * kap * (g_kd.abs() + g_ce.abs()) + 1e-30
    assert bool(((g - g_kd - g_ce).abs() <= bound).all())
    assert float(metrics["alpha/spm"]) == 0.2 and float(metrics["excluded/spm"]) == 0
    for j, name in enumerate(("spm", "same")):
        a = tds[j]["alignment"]
        assert float(metrics[f"valid_frac/{name}"]) == a.chunk_valid.sum().item() / a.num_chunks.sum().item()


def test_fixed_scaling_weights(toks, batch):
    s, m, _ = toks
    d = Distiller(s, [Teacher(Table(len(m), 1), m)], scaling="fixed", ce_weight=0.1, kd_weight=2.0)
    _, z = student_logits(toks, batch)
    loss, met = d(z, only(batch, 0))
    want = 2.0 * met["kd"] + 0.1 * met["ce"]
    assert abs(float(loss.detach()) - float(want)) <= C * U32 * float(want) and float(met["kd_scale"]) == 2.0


def test_auto_follows_the_audit_per_teacher(toks, batch):
    s, m, q = toks
    # student GPT-2 (multi-digit numerals): P-KL for Mistral; student Mistral (single digits): H-KL for GPT-2 / Qwen3
    for student, teacher in ((s, m), (m, s), (m, q)):
        col = xt.Collator(student, [teacher], max_length=24)
        b = col(TEXTS[:1])
        d = Distiller(student, [Teacher(Table(len(teacher), 1), teacher)])
        d(Table(len(student), 0)(b["input_ids"]), b)
        proj = xt.Projection.from_tokenizers(student, teacher, len(student), len(teacher), progress=False)
        assert d.teachers[0].kind == proj.audit().recommendation == ("pkl" if student is s else "hkl")
    with pytest.raises(ValueError, match="loss='kl' needs the student's tokenizer"):
        Distiller(s, [Teacher(Table(len(m), 1), m, loss="kl")])(Table(len(s), 0)(batch["input_ids"]),
                                                                 only(batch, 0))


def test_shared_tokenizer_is_the_plain_token_kl(toks, batch):
    """KL(p_T ‖ p_S) per next-token position of the valid chunks (1:1 for a shared tokenizer), float64 by hand."""
    s, _, _ = toks
    teacher = Table(len(s), 2, 3.0)
    td = batch["teachers"][1]
    d = Distiller(s, [Teacher(teacher, s, temperature=2.0)])
    _, z = student_logits(toks, batch)
    _, met = d(z, only(batch, 1))
    zt = teacher(td["input_ids"]).detach()
    terms = []
    for b, lo, hi, t_lo, t_hi in td["alignment"].row_spans().tolist():
        assert hi - lo == 1 and t_hi - t_lo == 1 and lo == t_lo  # one token each side, same position
        p = torch.softmax(zt[b, t_lo].double() / 2, -1)
        terms.append(4 * (p * (p.log() - torch.log_softmax(z[b, lo].double() / 2, -1))).sum())
    want = float(torch.stack(terms).mean().detach())
    assert abs(float(met["kd"]) - want) <= C * U32 * kappa(z, zt, 2.0) * (want + 4)


@pytest.mark.parametrize("confidence", ["entropy", "max_prob", "ce"])
def test_confidence_weights_are_a_softmax_of_teacher_scores(toks, batch, confidence):
    s, m, _ = toks
    teachers = [Table(len(m), 1, 3.0), Table(len(s), 2, 1.0)]
    d = Distiller(s, [Teacher(t, tok) for t, tok in zip(teachers, (m, s))], weighting="confidence",
                  confidence=confidence, confidence_temperature=0.5)
    _, z = student_logits(toks, batch)
    _, met = d(z, batch)
    scores = []
    for t, td in zip(teachers, batch["teachers"]):
        zt = t(td["input_ids"]).detach().double()
        vals = []
        for b, _, _, t_lo, t_hi in td["alignment"].row_spans().tolist():
            for p in range(t_lo, t_hi):
                lp = torch.log_softmax(zt[b, p], -1)
                vals.append({"entropy": (lp.exp() * lp).sum(), "max_prob": lp.max().exp(),
                             "ce": lp[td["input_ids"][b, p + 1]]}[confidence])
        scores.append(torch.stack(vals).mean())
    alpha = torch.softmax(torch.stack(scores) / 0.5, 0)
    kap = kappa(z, zt, 1.0)
    for j, name in enumerate(("teacher0", "teacher1")):
        assert abs(float(met[f"alpha/{name}"]) - float(alpha[j])) <= C * U32 * kap * 4
    assert abs(float(alpha[0]) - 0.5) > 0.01
    want = alpha[0] * met["kd/teacher0"] + alpha[1] * met["kd/teacher1"]
    assert abs(float(met["kd"]) - float(want)) <= C * U32 * kap * float(want)
    # the temperature's limits: score / 1e-310 overflowed both scores to -inf and the weights were NaN; they are
    # the argmax (tiny) and uniform (huge) weights
    best = int(torch.argmax(torch.stack(scores)))
    for tau, limit in ((1e-310, [float(j == best) for j in range(2)]), (1e300, [0.5, 0.5])):
        d.confidence_temperature = tau
        met = d(z, batch)[1]
        assert [float(met[f"alpha/teacher{j}"]) for j in range(2)] == limit


class Fixed(torch.nn.Module):
    """A teacher returning given logits."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, input_ids, attention_mask=None):
        return self.logits


def test_top1_agreement_matches_the_dense_projection(toks, batch):
    """On the first row pair of each valid chunk: argmax of Wᵀp_S (float64, sparse W by hand) vs the teacher's.
    Half the chunks are made to agree through an exact row of W, the others to disagree."""
    s, m, _ = toks
    td = batch["teachers"][0]
    W = xt.Projection.from_tokenizers(s, m, len(s), len(m), progress=False)
    exact = torch.nonzero((W.weights[:, 0] == 1) & (W.indices[:, 1] < 0)).flatten()
    g = torch.Generator().manual_seed(5)
    z = torch.randn(*batch["input_ids"].shape, len(s), generator=g)
    zt = torch.randn(*td["input_ids"].shape, len(m), generator=g)
    rs = td["alignment"].row_spans()
    for k, (b, lo, _, t_lo, _) in enumerate(rs.tolist()):
        v = int(exact[(37 * k) % exact.numel()])
        z[b, lo, v] += 30.0
        zt[b, t_lo, int(W.indices[v, 0]) if k % 2 == 0 else (int(W.indices[v, 0]) + 1) % len(m)] += 30.0
    _, met = Distiller(s, [Teacher(Fixed(zt), m)])(z, only(batch, 0))
    keep = W.indices >= 0
    rows_v = torch.arange(len(s))[:, None].expand_as(W.indices)[keep]
    Wt = torch.sparse_coo_tensor(torch.stack([W.indices[keep].long(), rows_v]), W.weights[keep].double(),
                                 (len(m), len(s)), check_invariants=True)  # Wᵀ, float64
    p = torch.softmax(z[rs[:, 0], rs[:, 1]].double(), -1)
    q = torch.sparse.mm(Wt, p.T).T  # [chunks, V_T]: Σ_v p_S(v) W[v, :]
    hits = int((q.argmax(1) == zt[rs[:, 0], rs[:, 3]].argmax(1)).sum())
    assert hits == (rs.shape[0] + 1) // 2
    assert float(met["top1/teacher0"]) == hits / rs.shape[0]
    # a teacher row without a finite value (all −inf) has no argmax: its chunk (0, a hit) is not counted (it was, as
    # a miss against column 0)
    b0, t0 = int(rs[0, 0]), int(rs[0, 3])
    zt[b0, t0] = -math.inf
    _, met = Distiller(s, [Teacher(Fixed(zt), m)])(z, only(batch, 0))
    assert float(met["top1/teacher0"]) == (hits - 1) / (rs.shape[0] - 1)
    # a student equal to a teacher with its tokenizer agrees everywhere (and KL = 0)
    same = Distiller(s, [Teacher(Table(len(s), 0), s)])
    _, met2 = same(Table(len(s), 0)(batch["input_ids"]), only(batch, 1))
    assert float(met2["top1/teacher0"]) == 1.0 and float(met2["kd"]) < 1e-6


def test_entropy_confidence_of_a_top_k_cached_teacher_beside_a_live_one_warns(toks, tmp_path):
    """A top-k cache leaves the tail out of a teacher's entropy: confidence weighting favoured it silently over a
    teacher scored on its full rows."""
    s, m, _ = toks
    ids = xt.Collator(s, [m], max_length=20).teacher_ids(TEXTS[:2])
    top4 = xt.teacher_cache.build(Table(len(m), 1, 3.0), m, ids, tmp_path / "c4", k=4, progress=False)
    full = xt.teacher_cache.build(Table(len(m), 1, 3.0), m, ids, tmp_path / "cf", k=len(m), progress=False)
    with pytest.warns(UserWarning, match=r"scores teachers \['c'\] on their cached top-k log-probs"):
        Distiller(s, [Teacher(None, m, cache=top4, name="c"), Teacher(Table(len(m), 2), m)], weighting="confidence")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for cache, confidence, weighting in ((top4, "max_prob", "confidence"), (full, "entropy", "confidence"),
                                             (top4, "entropy", "static")):
            Distiller(s, [Teacher(None, m, cache=cache), Teacher(Table(len(m), 2), m)], weighting=weighting,
                      confidence=confidence)
        Distiller(s, [Teacher(None, m, cache=top4), Teacher(None, m, cache=top4)], weighting="confidence")


def test_cached_teacher_reproduces_the_dense_teacher(toks, tmp_path):
    s, m, _ = toks
    teacher = Table(len(m), 1, 3.0)
    plain = xt.Collator(s, [m], max_length=20)
    cache = xt.teacher_cache.build(teacher, m, plain.teacher_ids(TEXTS[:2]), tmp_path / "c", k=len(m),
                                   dtype=torch.float32, progress=False)
    dense = Distiller(s, [Teacher(teacher, m)])
    cached = Distiller(s, [Teacher(None, m, cache=cache)])
    b_dense = plain(TEXTS[:2])
    b_cached = cached.collator(max_length=20)(TEXTS[:2])
    assert "topk_logprobs" in b_cached["teachers"][0] and "topk_logprobs" not in b_dense["teachers"][0]
    _, z = student_logits(toks, b_dense)
    _, a = dense(z, b_dense)
    _, b = cached(z, b_cached)
    kap = kappa(z, teacher.table.detach(), 1.0)
    for k in ("kd", "ce", "top1/teacher0"):
        assert abs(float(a[k]) - float(b[k])) <= C * U32 * kap * (abs(float(a[k])) + 1), k
    with pytest.raises(ValueError, match="confidence='ce' needs the teacher's full distribution"):
        Distiller(s, [Teacher(None, m, cache=cache)], weighting="confidence", confidence="ce")(z, b_cached)


def test_learnable_w_has_its_own_param_group(toks, batch):
    s, m, _ = toks
    d = Distiller(s, [Teacher(Table(len(m), 1), m, learnable=True, vocab_size=len(m))], student_vocab_size=len(s))
    groups = d.param_groups()
    assert len(groups) == 1 and groups[0]["lr"] == 1e-2 and groups[0]["weight_decay"] == 0.0
    (theta,) = groups[0]["params"]
    assert theta.shape == (len(s), 4) and d.teachers[0].kind == "pkl"
    _, z = student_logits(toks, only(batch, 0))
    loss, _ = d(z, only(batch, 0))
    loss.backward()
    assert theta.grad is not None and float(theta.grad.abs().sum()) > 0
    opt = torch.optim.AdamW(groups)
    before = d.kd_losses["teacher0"].proj.weights.detach().clone()
    opt.step()
    assert not torch.equal(before, d.kd_losses["teacher0"].proj.weights.detach())
    d.sync_grads()  # no process group: a no-op
    assert Distiller(s, [Teacher(Table(len(m), 1), m)]).param_groups() == []
    with pytest.raises(ValueError, match="learnable W"):
        Teacher(Table(len(m), 1), m, loss="hkl", learnable=True)


def test_teacher_runs_in_its_own_dtype_without_grad(toks, batch):
    s, m, _ = toks
    teacher = Table(len(m), 1, dtype=torch.bfloat16)
    d = Distiller(s, [Teacher(teacher, m)])
    table, z = student_logits(toks, batch)
    loss, _ = d(z, only(batch, 0))
    loss.backward()
    assert teacher.seen == [(torch.bfloat16, False)] and teacher.table.grad is None
    assert not teacher.training and not teacher.table.requires_grad
    assert table.table.grad is not None and torch.isfinite(table.table.grad).all()


def test_model_inputs_never_carry_alignment_keys(toks):
    s, m, _ = toks
    b = xt.Collator(s, [m], max_length=64)(TEXTS)
    assert set(Distiller.model_inputs(b)) == {"input_ids", "attention_mask"}
    packed = xt.Collator(s, [m], max_length=64, packing=True)(TEXTS)
    assert set(Distiller.model_inputs(packed)) == {"input_ids", "position_ids"}  # per-document masks from positions
    hf = type("HF", (), {"config": type("Config", (), {"use_cache": True})()})()
    assert Distiller.model_inputs(packed, hf)["use_cache"] is False


def test_packed_batches_give_the_unpacked_objective(toks):
    """A real causal transformer (tiny GPT-2, float64) sees per-document attention through position_ids, so the
    packed objective equals the unpacked one."""
    from transformers import GPT2Config, GPT2LMHeadModel

    s, m, _ = toks
    torch.manual_seed(0)

    def tiny(V):
        return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0,
                                          embd_pdrop=0, attn_pdrop=0)).double().eval()

    student, teacher = tiny(len(s)), tiny(len(m))
    d = Distiller(s, [Teacher(teacher, m)], scaling="fixed")
    out = []
    for packing in (False, True):
        b = xt.Collator(s, [m], max_length=64, packing=packing)(TEXTS)
        if packing:
            assert b["input_ids"].shape[0] < len(TEXTS)
        _, met = d(student(**Distiller.model_inputs(b, student)).logits, b)
        out.append(met)
    for k in ("ce", "kd", "top1/teacher0"):
        assert abs(float(out[0][k]) - float(out[1][k])) <= 1e-9 * (abs(float(out[0][k])) + 1), k


def test_objective_under_a_float64_default_dtype(toks, batch):
    """Buffers that took the default dtype (the top-1 metric's Wᵀp) broke Distiller.forward under
    torch.set_default_dtype(torch.float64); the objective is the same as under float32."""
    s, m, _ = toks
    _, z = student_logits(toks, batch)
    ref_loss, ref_met = Distiller(s, [Teacher(Table(len(m), 1), m)])(z, only(batch, 0))
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        loss, met = Distiller(s, [Teacher(Table(len(m), 1), m)])(z, only(batch, 0))
    finally:
        torch.set_default_dtype(old)
    assert torch.equal(loss, ref_loss) and met["top1/teacher0"] == ref_met["top1/teacher0"]


def test_errors(toks, batch):
    s, m, _ = toks
    with pytest.raises(ValueError, match="loss must be one of"):
        Teacher(None, m, loss="kd", vocab_size=10)
    with pytest.raises(ValueError, match="needs cache= or vocab_size="):
        Teacher(None, m)
    with pytest.raises(ValueError, match="apply to scaling='fixed'"):
        Distiller(s, [Teacher(Table(3, 0), m)], ce_weight=0.1)
    with pytest.raises(ValueError, match="unique"):
        Distiller(s, [Teacher(Table(3, 0), m, name="a"), Teacher(Table(3, 0), m, name="a")])
    twice = Teacher(Table(3, 0), m)
    with pytest.raises(ValueError, match=r"teachers\[1\] is the same Teacher object as teachers\[0\]"):
        Distiller(s, [twice, twice])
    # a generator of teachers was read by the type check and left the Distiller none
    assert len(Distiller(s, (Teacher(Table(3, 0), m, name=n) for n in "ab")).teachers) == 2
    for bad in (twice, 3, "ab", []):
        with pytest.raises(TypeError, match="teachers must be a non-empty list of xt.Teacher"):
            Distiller(s, bad)
    nan, inf = float("nan"), float("inf")
    for bad in (nan, inf, 0.0):  # NaN passed a `<= 0` check and made the loss NaN
        with pytest.raises(ValueError, match="confidence_temperature must be finite and > 0"):
            Distiller(s, [Teacher(Table(3, 0), m)], weighting="confidence", confidence_temperature=bad)
        with pytest.raises(ValueError, match="temperature must be finite and > 0"):
            Teacher(Table(3, 0), m, temperature=bad)
    for bad in (nan, inf, -1.0):
        with pytest.raises(ValueError, match="weight must be finite and >= 0"):
            Teacher(Table(3, 0), m, weight=bad)
    d = Distiller(s, [Teacher(Table(len(m), 1), m)])
    _, z = student_logits(toks, batch)
    with pytest.raises(ValueError, match="2 teachers, the Distiller 1"):
        d(z, batch)
    with pytest.raises(ValueError, match="no model and the batch carries no cached"):
        Distiller(s, [Teacher(None, m, vocab_size=len(m))])(z, only(batch, 0))
    # counts made for one teacher broadcast onto two (each teacher's KD divided by the first's count) before
    two = Distiller(s, [Teacher(Table(len(m), 1), m), Teacher(Table(len(s), 2), s)])
    one = d.normalizers(only(batch, 0))
    with pytest.raises(ValueError, match=r"chunks \[2\] \(one per teacher\), got \(\) and \(1,\)"):
        two(z, batch, normalizers=one)
    assert torch.isfinite(two(z, batch, normalizers=two.normalizers(batch))[0])


def test_nonfinite_policy_is_passed_to_the_losses(toks, batch):
    """With the losses' `nonfinite` keyword (POLICY.md), "mask" excludes a NaN teacher chunk and reports it."""
    s, m, _ = toks
    teacher = Table(len(m), 1)
    with torch.no_grad():
        teacher.table[batch["teachers"][0]["input_ids"][0, 3] % M] = float("nan")
    one = only(batch, 0)
    _, z = student_logits(toks, batch)
    if "nonfinite" not in __import__("inspect").signature(xt.pkl_loss).parameters:
        with pytest.raises(ValueError, match="nonfinite= needs losses"):
            Distiller(s, [Teacher(teacher, m)], nonfinite="mask")
        return
    loss, met = Distiller(s, [Teacher(teacher, m)], nonfinite="mask")(z, one)
    assert torch.isfinite(loss) and float(met["excluded/teacher0"]) >= 1
    with pytest.raises(ValueError, match="teacher_logits"):
        Distiller(s, [Teacher(teacher, m)])(z, one)  # the default policy raises


@pytest.mark.parametrize("value", [math.nan, -math.inf])
def test_masked_nonfinite_teacher_rows_leave_the_confidence_scores(toks, batch, value):
    """nonfinite="mask" with confidence weighting: a NaN teacher row's chunk is excluded from the loss and its row
    from the teacher's score (it made α, the loss and the gradient NaN), and from top-1 agreement. An all −inf row
    (zero probabilities, not an error for the losses) has no score either: its log-softmax is NaN, which made α,
    the loss and the gradient NaN."""
    s, m, _ = toks
    bad, good = Table(len(m), 1), Table(len(m), 2)
    ids = batch["teachers"][0]["input_ids"]
    with torch.no_grad():
        bad.table[ids[0, 3] % M] = value
    two = {**batch, "teachers": [batch["teachers"][0]] * 2}
    for confidence in ("entropy", "max_prob", "ce"):
        d = Distiller(s, [Teacher(bad, m), Teacher(good, m)], weighting="confidence", confidence=confidence,
                      nonfinite="mask")
        table, z = student_logits(toks, batch)
        loss, met = d(z, two)
        loss.backward()
        assert torch.isfinite(loss) and bool(table.table.grad.isfinite().all())
        assert (float(met["excluded/teacher0"]) >= 1) == (value != -math.inf)  # −inf rows: no error for the loss
        assert float(met["excluded/teacher1"]) == 0
        scores = []
        for t in (bad, good):
            zt, vals = t(ids).detach().double(), []
            for b, _, _, t_lo, t_hi in batch["teachers"][0]["alignment"].row_spans().tolist():
                for p in range(t_lo, t_hi):
                    if bool(zt[b, p].isnan().any()) or not bool(zt[b, p].isfinite().any()):
                        continue
                    lp = torch.log_softmax(zt[b, p], -1)
                    vals.append({"entropy": (lp.exp() * lp).sum(), "max_prob": lp.max().exp(),
                                 "ce": lp[ids[b, p + 1]]}[confidence])
            scores.append(torch.stack(vals).mean())
        alpha = torch.softmax(torch.stack(scores), 0)
        for j in range(2):
            assert abs(float(met[f"alpha/teacher{j}"]) - float(alpha[j])) <= C * U32 * kappa(z, zt, 1.0) * 4
        assert 0 <= float(met["top1/teacher0"]) <= 1


def test_teacher_names_are_kept_and_any_text(toks, batch):
    """A name with "." or "/" (a hub id) works: metrics carry it, the loss module's key (a checkpoint's file names)
    is escaped; it crashed at the first forward. Default names stay the Distiller's: the Teacher objects are not
    renamed (a second Distiller saw them as user names)."""
    s, m, _ = toks
    a, b = Teacher(Table(len(m), 1), m, name="Qwen/Qwen2.5-0.5B"), Teacher(Table(len(s), 2), s)
    d = Distiller(s, [a, b])
    _, z = student_logits(toks, batch)
    _, met = d(z, batch)
    assert {"kd/Qwen/Qwen2.5-0.5B", "kd/teacher1"} <= set(met)
    assert list(d.kd_losses) == ["Qwen_Qwen2_5-0_5B", "teacher1"]
    assert b.name is None and Distiller(s, [b]).names == ["teacher0"]
    Distiller(s, [b, Teacher(Table(len(m), 1), m, name="teacher1")])  # b is teacher0 here
    with pytest.raises(ValueError, match="give the same key"):
        Distiller(s, [Teacher(Table(3, 0), m, name="a.b"), Teacher(Table(3, 0), m, name="a_b")])
    with pytest.raises(TypeError, match="name must be a non-empty str"):
        Teacher(Table(3, 0), m, name="")


def test_teacher_settings_are_checked_and_read_at_every_call(toks, batch):
    """loss_options are checked at construction (a typo failed at the first forward, and reduction / normalizer
    clashed with the Distiller's); weight, temperature and loss_options set after the first call take effect (they
    were frozen into the loss module) and are checked when set."""
    s, m, _ = toks
    with pytest.raises(TypeError, match=r"unknown loss option\(s\) \['weights'\]"):
        Teacher(Table(3, 0), m, weights=0.5)
    for clash in ("reduction", "normalizer"):
        with pytest.raises(TypeError, match="unknown loss option"):
            Teacher(Table(3, 0), m, **{clash: 1.0})
    one = only(batch, 0)
    _, z = student_logits(toks, batch)
    t = Teacher(Table(len(m), 1), m, loss="pkl")
    d = Distiller(s, [t], scaling="fixed")
    d(z, one)
    t.temperature, t.weight, t.loss_options["merge"] = 3.0, 0.5, "first"
    fresh = Distiller(s, [Teacher(t.model, m, loss="pkl", temperature=3.0, weight=0.5, merge="first")],
                      scaling="fixed")
    (loss, met), (want, want_met) = d(z, one), fresh(z, one)
    assert torch.equal(loss, want) and torch.equal(met["kd"], want_met["kd"])
    for attr, bad in (("weight", -1.0), ("weight", float("nan")), ("temperature", 0.0), ("weight", "1")):
        with pytest.raises((ValueError, TypeError), match=attr):
            setattr(t, attr, bad)


def test_distiller_weights_and_label_width_are_checked(toks, batch):
    """ce_weight / kd_weight: finite, >= 0, numbers (NaN gave a NaN loss, -2 ascended on KD, "0.5" passed). Labels
    past the student's logit width name the fix (cross_entropy raised an IndexError; a device assert on CUDA)."""
    s, m, _ = toks
    for key in ("ce_weight", "kd_weight"):
        for bad in (float("nan"), float("inf"), -2.0):
            with pytest.raises(ValueError, match=f"{key} must be finite and >= 0"):
                Distiller(s, [Teacher(Table(3, 0), m)], scaling="fixed", **{key: bad})
        with pytest.raises(TypeError, match=f"{key} must be a real number"):
            Distiller(s, [Teacher(Table(3, 0), m)], scaling="fixed", **{key: "0.5"})
    _, z = student_logits(toks, batch)
    d = Distiller(s, [Teacher(Table(len(m), 1), m)])
    top = int(batch["labels"].max())
    with pytest.raises(ValueError, match=f"token id {top} but student_logits are {top} wide: resize"):
        d(z[..., :top], only(batch, 0))


def test_next_token_ce_skips_ignore_index_labels():
    """HF-style -100 labels are skipped and not counted (they were counted: the mean was diluted)."""
    z = torch.randn(1, 5, 11, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[3, 4, -100, 7, -100]])
    assert torch.equal(next_token_ce(z, labels), next_token_ce(z, labels.clamp_min(0), labels != -100))
    want = -(torch.log_softmax(z[0, 0], -1)[4] + torch.log_softmax(z[0, 2], -1)[7]) / 2
    assert abs(float(next_token_ce(z, labels)) - float(want)) <= 8 * U32 * abs(float(want))


def test_a_given_w_must_match_the_tokenizers(toks, batch):
    """A W built for another tokenizer pair was accepted when only its widths matched."""
    s, m, q = toks
    w = xt.Projection.from_tokenizers(s, m, progress=False)
    _, z = student_logits(toks, batch)
    with pytest.raises(ValueError, match="W was built for another teacher tokenizer"):
        Distiller(s, [Teacher(Table(len(m), 1), q, loss="pkl", projection=w)])(z, only(batch, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # W's own tokenizers: no behaviour warning
        loss, _ = Distiller(s, [Teacher(Table(len(m), 1), m, loss="pkl", projection=w)])(z, only(batch, 0))
    assert torch.isfinite(loss)
    # the teacher's vocabulary with another normalizer (same fingerprint): warned as Projection.load warns
    lower = copy.deepcopy(m)
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert xt.token_table(lower).fingerprint == xt.token_table(m).fingerprint
    with pytest.warns(UserWarning, match="teacher 'teacher0': W: built for a teacher tokenizer with the same "
                                         "vocabulary but another behaviour hash"):
        Distiller(s, [Teacher(Table(len(m), 1), lower, loss="pkl", projection=w)])(z, only(batch, 0))
    learned = LearnableProjection(w)  # has no meta of its own: its base W's is checked (a first fix crashed here)
    with pytest.raises(ValueError, match="W was built for another teacher tokenizer"):
        Distiller(s, [Teacher(Table(len(m), 1), q, loss="pkl", projection=learned)])(z, only(batch, 0))
    assert torch.isfinite(Distiller(s, [Teacher(Table(len(m), 1), m, loss="pkl", projection=learned)])(
        z, only(batch, 0))[0])
    # with loss="auto" (the audit crashed on it) and learnable=True (it was wrapped again: the given θ never trained)
    for kw in ({"loss": "pkl"}, {"loss": "auto"}, {"loss": "pkl", "learnable": True}):
        d = Distiller(s, [Teacher(Table(len(m), 1), m, projection=learned, **kw)])
        # θ is the Distiller's from construction, as with learnable=True: it was only made at the first batch, so
        # DistillTrainer's optimizer (built before it) never trained it and a resume refused the checkpoint
        assert [g["params"] for g in d.param_groups()] == [[learned.theta]]
        d(z.detach(), only(batch, 0))[0].backward()
        assert d.kd_losses["teacher0"].proj is learned and [g["params"] for g in d.param_groups()] == [[learned.theta]]
        assert learned.theta.grad is not None and bool(learned.theta.grad.ne(0).any())
        learned.theta.grad = None


def test_top1_leaves_a_learnable_w_where_it_is(toks, batch, monkeypatch):
    """top-1 agreement moved a LearnableProjection (a module) to the logits' device with .to(): on another device
    θ itself moved, away from its optimizer state. It now reads W's tensors without moving the module."""
    s, m, _ = toks
    d = Distiller(s, [Teacher(Table(len(m), 1), m, loss="pkl", learnable=True, vocab_size=len(m))],
                  student_vocab_size=len(s))
    lp = d.kd_losses["teacher0"].proj

    def moved(*a, **k):
        raise AssertionError("the LearnableProjection module was moved")

    monkeypatch.setattr(lp, "to", moved)
    one = only(batch, 0)
    _, z = student_logits(toks, batch)
    t = Table(len(m), 1)(one["teachers"][0]["input_ids"])
    hits, n = d._top1(z.detach(), t.detach(), None, one["teachers"][0]["alignment"], lp, len(m))
    assert 0 <= int(hits) <= int(n) == one["teachers"][0]["alignment"].row_spans().shape[0]
