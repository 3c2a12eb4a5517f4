"""End to end with real tokenizers (Llama-3 student, Qwen3 teacher, offline) and random logits of the real widths:
W from the tokenizers, C++ alignment of raw texts, the losses and the CE+KD objective, backward."""
import pytest
import torch

import xtoken_ext as xt

TEXTS = ["The year 2024 had 366 days; 12,345 apples cost $3.50 in total.",
         "def area(r):\n    return 3.14159 * r ** 2  # 中文 🚀",
         "Ünïcödé   whitespace\n\n\tand numbers 1234567890"]


@pytest.fixture(scope="module")
def setup(offline_tok):
    s, t = offline_tok("llama3"), offline_tok("qwen3")
    proj = xt.Projection.from_tokenizers(s, t, student_vocab_size=128256, teacher_vocab_size=151936, progress=False)
    batch = xt.Aligner(s, t).align_batch(TEXTS)
    return s, t, proj, batch


def test_valid_chunks_decode_to_the_same_text(setup):
    s, t, _, batch = setup
    assert batch.chunk_valid.any()
    for b, k in batch.chunk_valid.nonzero().tolist():
        s0, s1, t0, t1 = batch.chunks[b, k].tolist()
        assert s.decode(batch.student_ids[b, s0:s1]) == t.decode(batch.teacher_ids[b, t0:t1])


@pytest.mark.parametrize("loss_fn", [xt.pkl_loss, xt.hkl_loss, xt.gold_loss])
def test_objective_backward_on_real_widths(setup, loss_fn):
    _, _, proj, batch = setup
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(*batch.student_ids.shape, 128256, generator=g, requires_grad=True)
    zt = 3 * torch.randn(*batch.teacher_ids.shape, 151936, generator=g)
    kd = loss_fn(zs, zt, batch, proj)
    ce = xt.distill.next_token_ce(zs, batch.student_ids, batch.student_attention_mask)
    loss, _ = xt.distill.combine_losses(ce, kd)
    assert torch.isfinite(kd) and torch.isclose(loss, 2 * ce)  # dynamic scaling: value 2·CE
    loss.backward()
    assert torch.isfinite(zs.grad).all()
    # KD alone touches exactly the predictive rows of valid chunks.
    zs.grad = None
    loss_fn(zs, zt, batch, proj).backward()
    rows = torch.zeros(zs.shape[:2], dtype=torch.bool)
    for b, s_lo, s_hi, _, _ in batch.row_spans().tolist():
        rows[b, s_lo:s_hi] = True
    touched = zs.grad.abs().sum(-1) > 0
    assert torch.equal(touched, rows)
