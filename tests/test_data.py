"""xt.Collator (xtoken_ext/data.py) with real offline tokenizers: Llama-3 student, Qwen3 and byte-fallback
SentencePiece (Mistral) teachers; raw text, prompt/completion, each tokenizer's own chat template, packing, DataLoader
workers, datasets.map precomputation and on-policy ids."""
import copy
import warnings

import numpy as np
import pytest
import torch
from tokenizers import normalizers, processors
from test_teacher_cache import TinyTeacher

import xtoken_ext as xt
from xtoken_ext.data import pack_plan
from xtoken_ext.tokenizers import token_table

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
           "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")

TEXTS = ["The year 2024 had 366 days; 12,345 apples cost $3.50 in total.",
         "def area(r):\n    return 3.14159 * r ** 2  # 中文 🚀",
         "Ünïcödé   whitespace\n\n\tand numbers 1234567890"]
PAIRS = [{"prompt": "Question: what is 12 + 30?\nAnswer:", "completion": " 42 apples, and 7 pears."},
         {"prompt": "Translate to French: good morning.", "completion": " Bonjour à tous !"}]
CHATS = [{"messages": [{"role": "user", "content": "How many days had 2024?"},
                       {"role": "assistant", "content": "It had 366 days, a leap year."},
                       {"role": "user", "content": "And 2023?"},
                       {"role": "assistant", "content": "365 days."}]}]


@pytest.fixture(scope="module")
def toks(offline_tok):
    s, q, m = offline_tok("llama3"), offline_tok("qwen3"), offline_tok("mistral-spm")
    return s, q, m


@pytest.fixture
def chat_toks(toks):
    """The offline tokenizers ship no chat template: give each its family's template (restored afterwards)."""
    s, q, m = toks
    old = [t.chat_template for t in toks]
    s.chat_template, q.chat_template, m.chat_template = LLAMA3, CHATML, MISTRAL
    yield toks
    for t, c in zip(toks, old):
        t.chat_template = c


def same_text(a: str, b: str) -> bool:
    # SentencePiece decodes a lone "▁x" without its space; the rest must match exactly.
    return a == b or a.lstrip(" ") == b.lstrip(" ")


def valid_pairs(batch, teacher_toks):
    """(teacher j, b, student text, teacher text, student range, teacher range) of every valid chunk."""
    s_tok = teacher_toks[0]
    out = []
    for j, (td, tok) in enumerate(zip(batch["teachers"], teacher_toks[1:])):
        a = td["alignment"]
        for b, k in a.chunk_valid.nonzero().tolist():
            s0, s1, t0, t1 = a.chunks[b, k].tolist()
            out.append((j, b, s_tok.decode(batch["input_ids"][b, s0:s1]), tok.decode(td["input_ids"][b, t0:t1]),
                        (s0, s1), (t0, t1)))
    return out


def test_raw_text_matches_align_batch_and_shares_the_student_side(toks):
    s, q, m = toks
    batch = xt.Collator(s, [q, m])(TEXTS)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "teachers"}
    mask = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"], torch.where(mask, batch["input_ids"], -100))
    for td, t in zip(batch["teachers"], (q, m)):
        ref = xt.Aligner(s, t).align_batch(TEXTS)
        a = td["alignment"]
        for name in ("chunks", "chunk_valid", "chunk_correct", "num_chunks", "student_ids", "teacher_ids"):
            assert torch.equal(getattr(a, name), getattr(ref, name)), name
        assert torch.equal(a.student_ids, torch.where(mask, batch["input_ids"], 0))  # one student side
        assert torch.equal(td["input_ids"][td["attention_mask"].bool()], ref.teacher_ids[ref.teacher_attention_mask])
        assert a.chunk_valid.sum() > 20


def test_completion_only_masks_kd_chunks_and_labels(toks):
    s, q, m = toks
    batch = xt.Collator(s, [q, m])(PAIRS)
    full = xt.Collator(s, [q, m], completion_only=False)(PAIRS)
    for b, ex in enumerate(PAIRS):
        kept = batch["labels"][b][batch["labels"][b] >= 0]
        assert s.decode(kept) == ex["completion"]
        assert (full["labels"][b] >= 0).sum() > len(kept)
    pairs = valid_pairs(batch, toks)
    assert pairs and all(same_text(a, b) for _, _, a, b, _, _ in pairs)
    for j, b, a, _, _, _ in pairs:
        assert a in PAIRS[b]["completion"]
    # every completion token's chunk is counted except those without a predictive row on both sides
    assert sum(len(a) for j, b, a, _, _, _ in pairs if j == 0 and b == 0) >= len(PAIRS[0]["completion"]) - 3
    for td, td_full in zip(batch["teachers"], full["teachers"]):
        assert td_full["alignment"].chunk_valid.sum() > td["alignment"].chunk_valid.sum()
        assert not (td["alignment"].chunk_valid & ~td_full["alignment"].chunk_valid).any()


def test_a_token_straddling_prompt_and_completion_counts_nowhere(toks):
    s, q, _ = toks
    ex = {"prompt": "Hello wor", "completion": "ld peace and more"}
    batch = xt.Collator(s, [q])([ex])
    labels = batch["labels"][0]
    assert s.decode(labels[labels >= 0]) == " peace and more"  # "world" is one token: not labelled
    texts = [a for _, _, a, _, _, _ in valid_pairs(batch, (s, q))]
    assert texts and "world" not in "".join(texts) and all(t in " peace and more" for t in texts)


def test_chat_rendered_by_each_template_pairs_content_and_end_of_turn(chat_toks):
    s, q, m = chat_toks
    batch = xt.Collator(s, [q, m])(CHATS)
    assert s.decode(batch["input_ids"][0]).startswith("<|begin_of_text|><|start_header_id|>user")
    assert q.decode(batch["teachers"][0]["input_ids"][0]).startswith("<|im_start|>user\n")
    assert m.decode(batch["teachers"][1]["input_ids"][0]).startswith("<s>[INST]")
    answers = [x["content"] for x in CHATS[0]["messages"] if x["role"] == "assistant"]
    labels = batch["labels"][0]
    assert s.decode(labels[labels >= 0]) == "".join(a + "<|eot_id|>" for a in answers)
    eot = {0: ("<|eot_id|>", "<|im_end|>"), 1: ("<|eot_id|>", "</s>")}
    for j in (0, 1):
        pairs = [p for p in valid_pairs(batch, chat_toks) if p[0] == j]
        ends = [p for p in pairs if p[2:4] == eot[j]]
        assert len(ends) == len(answers)  # end of turn distilled 1:1 across families
        content = "".join(p[2] for p in pairs if p not in ends)
        assert all(same_text(p[2], p[3]) for p in pairs if p not in ends)
        assert "How many" not in content and "366 days" in content  # completion-only: assistant turns only
    # Everything: user turns count too, template markup never does.
    full = xt.Collator(s, [q, m], completion_only=False)(CHATS)
    pairs = valid_pairs(full, chat_toks)
    assert "How many days had 2024?" in "".join(p[2] for p in pairs if p[0] == 0)
    for j, _, a, b, _, _ in pairs:
        assert same_text(a, b) or (a, b) == eot[j] or (j == 0 and (a, b) == ("<|eot_id|>", "<|im_end|>"))
        assert "header" not in a and "im_start" not in b and "INST" not in b


def test_chat_markup_never_counts_even_with_include_mismatched(chat_toks):
    s, q, m = chat_toks
    # Mistral's "[INST] How" makes "▁How" straddle markup and content: an incorrect chunk, never counted.
    batch = xt.Collator(s, [q, m], completion_only=False, include_mismatched=True)(CHATS)
    a = batch["teachers"][1]["alignment"]
    c = a.chunks[0, :a.num_chunks[0]]
    non_gap = (c[:, 1] > c[:, 0]) & (c[:, 3] > c[:, 2])
    straddling = non_gap & ~a.chunk_correct[0, :len(c)]
    assert straddling.any() and not (a.chunk_valid[0, :len(c)] & straddling).any()
    for j, _, x, y, _, _ in valid_pairs(batch, chat_toks):
        assert same_text(x, y) or y in ("<|im_end|>", "</s>")


def test_chat_content_trimmed_by_one_template_still_aligns(chat_toks):
    s, q, _ = chat_toks
    ex = {"messages": [{"role": "user", "content": "  Count to three.\n"},
                       {"role": "assistant", "content": "\nOne, two, three.  "}]}
    batch = xt.Collator(s, [q])([ex])
    assert "\nOne, two, three.  <|im_end|>" in q.decode(batch["teachers"][0]["input_ids"][0])  # ChatML keeps it
    pairs = [(x, y) for _, _, x, y, _, _ in valid_pairs(batch, (s, q))]
    assert pairs[-1] == ("<|eot_id|>", "<|im_end|>") and all(x == y for x, y in pairs[:-1])
    assert "".join(x for x, _ in pairs[:-1]) == "One, two, three."


def test_chat_without_a_template_is_a_clear_error(toks):
    s, q, _ = toks
    with pytest.raises(ValueError, match="no chat template"):
        xt.Collator(s, [q])(CHATS)


def test_empty_and_whitespace_texts_give_zero_chunks_and_warn_once(toks):
    s, q, m = toks
    collator = xt.Collator(s, [q, m])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        batch = collator(["", "  \n\t ", TEXTS[0]])
        collator(["   "])
    assert len([w for w in rec if "whitespace-only" in str(w.message)]) == 1  # two calls, one warning
    assert (batch["labels"][:2] == -100).all() and (batch["labels"][2] >= 0).any()
    for td in batch["teachers"]:
        assert td["alignment"].chunk_valid[:2].sum() == 0 and td["alignment"].chunk_valid[2].sum() > 0
    only_empty = collator(["", ""])
    assert only_empty["input_ids"].shape[1] >= 1 and only_empty["teachers"][0]["input_ids"].shape[1] >= 1


def test_packing_in_lockstep_equals_unpacked(toks):
    s, q, m = toks
    examples = [*TEXTS, *PAIRS, "Short one.", "x = 1 + 2  # 3", {"prompt": "Say hi:", "completion": " hi!"}]
    L = 48
    unpacked = xt.Collator(s, [q, m], max_length=L)(examples)
    packed = xt.Collator(s, [q, m], max_length=L, packing=True)(examples)
    n_s = unpacked["attention_mask"].sum(1).tolist()
    n_t = [td["attention_mask"].sum(1).tolist() for td in unpacked["teachers"]]
    plan = pack_plan([[a, *(nt[i] for nt in n_t)] for i, a in enumerate(n_s)], L)
    assert len(plan) < len(examples) == sum(len(r) for r in plan)
    assert packed["input_ids"].shape[0] == len(plan) and packed["input_ids"].shape[1] <= L
    # where each document went: (row, student offset, teacher offsets)
    where = {}
    for r, row in enumerate(plan):
        offs = [0] * 3
        for i in row:
            where[i] = (r, *offs)
            offs = [o + n for o, n in zip(offs, [n_s[i], *(nt[i] for nt in n_t)])]
    for i, (r, os_, *ot) in where.items():
        assert torch.equal(packed["input_ids"][r, os_:os_ + n_s[i]], unpacked["input_ids"][i, :n_s[i]])
        assert torch.equal(packed["position_ids"][r, os_:os_ + n_s[i]], torch.arange(n_s[i]))
        for j, td in enumerate(packed["teachers"]):
            assert torch.equal(td["input_ids"][r, ot[j]:ot[j] + n_t[j][i]],
                               unpacked["teachers"][j]["input_ids"][i, :n_t[j][i]])
            assert torch.equal(td["position_ids"][r, ot[j]:ot[j] + n_t[j][i]], torch.arange(n_t[j][i]))
    for r, row in enumerate(plan):
        bounds = np.cumsum([0] + [n_s[i] for i in row])
        assert packed["cu_seqlens"][r, :len(bounds)].tolist() == bounds.tolist()

    g = torch.Generator().manual_seed(0)
    V_S, V_T = 64, 80
    zs_docs = [torch.randn(n, V_S, generator=g) for n in n_s]
    zs_u = torch.zeros(len(examples), unpacked["input_ids"].shape[1], V_S)
    zs_p = torch.zeros(*packed["input_ids"].shape, V_S)
    for i, (r, os_, *_) in where.items():
        zs_u[i, :n_s[i]] = zs_docs[i]
        zs_p[r, os_:os_ + n_s[i]] = zs_docs[i]
    for j in range(2):
        proj = xt.Projection.random(V_S, V_T, seed=j)
        zt_u = torch.zeros(len(examples), unpacked["teachers"][j]["input_ids"].shape[1], V_T)
        zt_p = torch.zeros(*packed["teachers"][j]["input_ids"].shape, V_T)
        for i, (r, _, *ot) in where.items():
            z = 3 * torch.randn(n_t[j][i], V_T, generator=g)
            zt_u[i, :n_t[j][i]] = z
            zt_p[r, ot[j]:ot[j] + n_t[j][i]] = z
        a_u, a_p = unpacked["teachers"][j]["alignment"], packed["teachers"][j]["alignment"]
        assert a_p.chunk_valid.sum() == a_u.chunk_valid.sum() > 0
        # no chunk crosses a document boundary on either side
        for r, k in a_p.chunk_valid.nonzero().tolist():
            s0, s1, t0, t1 = a_p.chunks[r, k].tolist()
            doc_s = np.searchsorted(packed["cu_seqlens"][r].numpy(), [s0 - 1, s1 - 1], "right")
            doc_t = np.searchsorted(packed["teachers"][j]["cu_seqlens"][r].numpy(), [t0 - 1, t1 - 1], "right")
            assert doc_s[0] == doc_s[1] and doc_t[0] == doc_t[1]
        for fn in (xt.pkl_loss, xt.hkl_loss):
            ref = fn(zs_u, zt_u, a_u, proj, reduction="sum")
            got = fn(zs_p, zt_p, a_p, proj, reduction="sum")
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)

    def ce(z, labels):  # real ids folded into the small random vocabulary
        labels = torch.where(labels >= 0, labels % V_S, -100)
        return torch.nn.functional.cross_entropy(z[:, :-1].transpose(1, 2), labels[:, 1:], reduction="sum")

    torch.testing.assert_close(ce(zs_p, packed["labels"]), ce(zs_u, unpacked["labels"]), rtol=1e-5, atol=1e-4)


def test_pack_plan_first_fit_decreasing():
    # by longest side: 1 (9), 0 (5), 2 (4), 3 (2); 0 does not fit beside 1 on the second side, 2 and 3 do
    assert pack_plan([[5, 2], [3, 9], [4, 1], [2, 2]], 10) == [[1, 2], [0, 3]]
    with pytest.raises(ValueError, match="capacity"):
        pack_plan([[11, 1]], 10)


def _same_batch(a, b):
    for k in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(a[k], b[k]), k
    for ta, tb in zip(a["teachers"], b["teachers"]):
        assert torch.equal(ta["input_ids"], tb["input_ids"])
        for name in ("chunks", "chunk_valid", "chunk_correct", "student_chunk_ids", "teacher_chunk_ids"):
            assert torch.equal(getattr(ta["alignment"], name), getattr(tb["alignment"], name)), name


@pytest.mark.filterwarnings("ignore:empty or whitespace-only")
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers(toks, offline_tok, context):
    s, q, m = toks
    # spawn pickles the collator into a fresh interpreter: small tokenizers keep that quick
    collator = xt.Collator(s, [q, m], max_length=32) if context == "fork" else \
        xt.Collator(offline_tok("gpt2"), [m], max_length=32)
    data = [*TEXTS, *PAIRS, ""]
    loader = torch.utils.data.DataLoader(data, batch_size=3, collate_fn=collator, num_workers=2 if context == "fork"
                                         else 1, multiprocessing_context=context)
    batches = list(loader)
    assert len(batches) == 2
    for i, batch in enumerate(batches):
        _same_batch(batch, collator(data[3 * i:3 * i + 3]))


@pytest.mark.filterwarnings("ignore:empty or whitespace-only")
def test_datasets_map_precomputes_alignment_columns(toks, offline_tok):
    import datasets  # the test extra installs it
    s, q, m = toks
    rows = [{"text": t} for t in TEXTS] + [{"text": "   "}]
    ds = datasets.Dataset.from_list(rows)
    # num_proc workers (small tokenizers: pickling Llama-3/Qwen3 to every worker costs seconds)
    small = xt.Collator(offline_tok("gpt2"), [m], max_length=40)
    pre = ds.map(small.preprocess, batched=True, batch_size=2, num_proc=2, remove_columns=["text"])
    assert {"xt_key", "xt_cut", "xt_student_ids", "xt_student_comp", "xt_teacher0_ids", "xt_teacher0_chunks",
            "xt_teacher0_correct", "xt_teacher0_keep"} == set(pre.column_names)
    _same_batch(small(list(pre)), small([r["text"] for r in rows]))
    collator = xt.Collator(s, [q, m], max_length=40)
    pre = ds.map(collator.preprocess, batched=True, batch_size=2, remove_columns=["text"])
    _same_batch(collator(list(pre)), collator([r["text"] for r in rows]))
    # A shorter max_length cuts the precomputed columns as it cuts fresh alignments.
    short = xt.Collator(s, [q, m], max_length=12)
    _same_batch(short(list(pre)), short([r["text"] for r in rows]))
    # A larger one (or none) refuses the rows preprocess cut: they would keep the shorter cut. Uncut rows pass.
    pre12 = ds.map(short.preprocess, batched=True, batch_size=2, remove_columns=["text"])
    assert any(pre12["xt_cut"]) and not all(pre12["xt_cut"]) and set(pre12["xt_cut"]) <= {0, 12}
    for larger in (collator, xt.Collator(s, [q, m])):
        with pytest.raises(ValueError, match="preprocess cut it to 12 tokens"):
            larger(list(pre12))
    uncut = [r for r, c in zip(pre12, pre12["xt_cut"]) if not c]
    _same_batch(collator(uncut), collator([r["text"] for r, c in zip(rows, pre12["xt_cut"]) if not c]))
    _same_batch(xt.Collator(s, [q, m], max_length=7)(list(pre12)), xt.Collator(s, [q, m], max_length=7)(
        [r["text"] for r in rows]))
    pc = datasets.Dataset.from_list(PAIRS).map(collator.preprocess, batched=True)
    _same_batch(collator(list(pc)), collator(PAIRS))
    with pytest.raises(ValueError, match="other tokenizers, chat templates or options"):
        xt.Collator(s, [q, m], completion_only=False)(list(pc))
    with pytest.raises(ValueError, match="other tokenizers"):
        small(list(pc))
    # the same vocabulary with another normalizer tokenizes otherwise: its rows were taken (only fingerprints keyed)
    lower = copy.deepcopy(s)
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert token_table(lower).fingerprint == token_table(s).fingerprint
    with pytest.raises(ValueError, match="other tokenizers"):
        xt.Collator(lower, [q, m], max_length=40)(list(pc))
    # nor another post-processor: raw texts take the tokenizer's own BOS / EOS (W's behaviour hash leaves it out)
    eos = copy.deepcopy(s)
    eos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A <|end_of_text|>", special_tokens=[("<|begin_of_text|>", s.bos_token_id),
                                                                       ("<|end_of_text|>", s.eos_token_id)])
    assert token_table(eos).behaviour == token_table(s).behaviour
    with pytest.raises(ValueError, match="other tokenizers"):
        xt.Collator(eos, [q, m], max_length=40)(list(pc))


LLAMA2 = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'].strip() + "
          "' [/INST]' }}{% else %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


def _labelled(tok, batch, b=0):
    lab = batch["labels"][b]
    return tok.convert_ids_to_tokens(lab[lab >= 0].tolist())


def test_completion_labels_reach_over_the_templates_whitespace(toks):
    """Llama-2's template writes "[/INST] " + answer + " " + "</s>": a SentencePiece student reads "▁Four" over the
    markup's space, which counted nowhere (the answer lost its first word), and its end of turn was looked for as
    the first token of the closing markup, "▁", so "</s>" was never labelled: the student never learnt to stop. The
    first word is labelled now but stays out of KD (its bytes are not the content's); the end of turn pairs with
    the teacher's and is distilled."""
    _, q, m = toks
    m, q = copy.deepcopy(m), copy.deepcopy(q)
    m.chat_template, q.chat_template = LLAMA2, CHATML
    ex = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four."}]}
    batch = xt.Collator(m, [q])([ex])
    assert _labelled(m, batch) == ["▁Four", ".", "▁", "</s>"]
    pairs = [(p[2], p[3]) for p in valid_pairs(batch, [m, q])]
    assert pairs == [(".", "."), ("</s>", "<|im_end|>")]


def test_a_tokenizers_own_eos_ends_the_completion(toks):
    """A tokenizer that appends EOS (add_eos_token=True, the usual SFT setting) gives it zero width at the end of
    the text: it was left out of a prompt/completion example's labels, so the student was never taught to stop."""
    from tokenizers import processors

    s, _, m = toks
    m = copy.deepcopy(m)
    m.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", m.bos_token_id), ("</s>", m.eos_token_id)])
    pair = {"prompt": "Q: 2+2?\nA:", "completion": " 4"}
    for completion_only in (None, True):
        assert _labelled(m, xt.Collator(m, [s], completion_only=completion_only)([pair])) == ["▁", "4", "</s>"]
    assert _labelled(m, xt.Collator(m, [s], completion_only=True)(["Some text."]))[-1] == "</s>"
    assert _labelled(m, xt.Collator(m, [s])([{"prompt": "Q: 2+2?\nA:", "completion": ""}])) == ["</s>"]
    with pytest.warns(UserWarning, match="empty or whitespace-only"):  # an empty text still gets no labels
        batch = xt.Collator(m, [s], completion_only=True)(["", "   "])
    assert _labelled(m, batch, 0) == _labelled(m, batch, 1) == []


def test_a_tool_calling_turn_the_template_renders_without_its_content(toks):
    """Llama-3.1's template renders an assistant message with tool_calls from the calls alone, not its (None)
    content: the collator raised "does not render message 1 exactly once" and failed the batch. The calls are that
    template's markup (never counted); the answer after the tool result is labelled and distilled."""
    s, q, _ = toks
    s, q = copy.deepcopy(s), copy.deepcopy(q)
    s.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if 'tool_calls' in m %}<|start_header_id|>assistant<|end_header_id|>"
        "\n\n{{ m.tool_calls[0].function.name }}({{ m.tool_calls[0].function.arguments | tojson }})<|eot_id|>"
        "{% else %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
        "{% endif %}{% endfor %}")
    q.chat_template = CHATML
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
    ex = {"messages": [{"role": "user", "content": "Weather in Paris?"},
                       {"role": "assistant", "content": None, "tool_calls": [call]},
                       {"role": "tool", "content": "18C"}, {"role": "assistant", "content": "It is 18C."}]}
    batch = xt.Collator(s, [q])([ex])
    assert "".join(_labelled(s, batch)) == "ItĠisĠ18C.<|eot_id|>"
    assert [(p[2], p[3]) for p in valid_pairs(batch, [s, q])][-1] == ("<|eot_id|>", "<|im_end|>")
    ex["messages"][1]["content"] = "calling"  # a content the template leaves out is still refused
    with pytest.raises(ValueError, match="does not render message 1 exactly once"):
        xt.Collator(s, [q])([ex])


def _tool():
    def add(a: int, b: int) -> int:
        """Add two numbers.

        Args:
            a: the first number
            b: the second number
        """
        return a + b

    return add


def test_preprocess_key_of_a_tool_function_is_its_schema(toks):
    """chat_template_kwargs={"tools": [fn]} keyed preprocess rows by str(fn), the function's address: a training
    process (another function object) refused the rows a preprocessing process wrote."""
    s, q, _ = toks
    rows = xt.Collator(s, [q], chat_template_kwargs={"tools": [_tool()]}).preprocess(
        {k: [p[k] for p in PAIRS] for k in PAIRS[0]})
    rows = [{k: v[i] for k, v in rows.items()} for i in range(len(PAIRS))]
    again = xt.Collator(s, [q], chat_template_kwargs={"tools": [_tool()]})  # the same tool, another object
    _same_batch(again(rows), again(PAIRS))

    def sub(a: int, b: int) -> int:
        """Subtract two numbers.

        Args:
            a: the first number
            b: the second number
        """
        return a - b

    for tools in ([sub], [_tool(), sub]):
        with pytest.raises(ValueError, match="other tokenizers, chat templates or options"):
            xt.Collator(s, [q], chat_template_kwargs={"tools": tools})(rows)


def test_on_policy_aligns_generated_ids(toks):
    s, q, m = toks
    collator = xt.Collator(s, [q, m])
    prompts, answers = ["Q: 12 + 30 =", "Name a prime:"], [" 42, surely.", " 7"]
    enc = [(s(p)["input_ids"], s(a, add_special_tokens=False)["input_ids"]) for p, a in zip(prompts, answers)]
    P = max(len(pi) for pi, _ in enc) + 1
    rows = [([0] * (P - len(pi)) + pi, ai) for pi, ai in enc]  # left-padded prompts of width P, then "generated"
    width = P + max(len(a) for _, a in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, (pi, ai) in enumerate(rows):
        ids[b, :P + len(ai)] = torch.tensor(pi + ai)
        mask[b, P - sum(x != 0 for x in pi):P + len(ai)] = 1
    batch = collator.on_policy(ids, attention_mask=mask, prompt_length=P)
    for b, (p, a) in enumerate(zip(prompts, answers)):
        real = ids[b][mask[b].bool()]
        assert torch.equal(batch["input_ids"][b, :len(real)], real)
        labels = batch["labels"][b]
        assert s.decode(labels[labels >= 0]) == a
        for j, t in enumerate((q, m)):
            t_ids = batch["teachers"][j]["input_ids"][b][batch["teachers"][j]["attention_mask"][b].bool()]
            assert t_ids.tolist() == t(p + a)["input_ids"]
            ref = xt.Aligner(s, t).align_ids(real, t_ids)
            got = batch["teachers"][j]["alignment"].chunks[b, :len(ref)]
            assert torch.equal(got, torch.as_tensor(ref))
    pairs = valid_pairs(batch, toks)
    assert pairs and all(same_text(x, y) and x in answers[b] for _, b, x, y, _, _ in pairs)


def test_on_policy_takes_ids_on_the_model_device_and_checks_prompt_length(toks):
    """generate() returns ids on the model's device: on_policy takes them there (the CUDA half runs on a GPU);
    a negative or non-int prompt_length is refused instead of silently counting every column."""
    s, q, _ = toks
    collator = xt.Collator(s, [q])
    ids = torch.tensor([s("Q: 1 + 1 = 2")["input_ids"]])
    with pytest.raises(ValueError, match="prompt_length"):
        collator.on_policy(ids, prompt_length=-1)
    with pytest.raises(TypeError, match="prompt_length"):
        collator.on_policy(ids, prompt_length=2.0)
    with pytest.raises(ValueError, match="student_ids must be integer"):
        collator.on_policy(ids.bool())
    if torch.cuda.is_available():
        _same_batch(collator.on_policy(ids.cuda(), attention_mask=torch.ones_like(ids).cuda(), prompt_length=3),
                    collator.on_policy(ids, attention_mask=torch.ones_like(ids), prompt_length=3))


def test_on_policy_byte_fallback_student_padding_empty_rows_and_threads(toks, tmp_path):
    """A SentencePiece byte-fallback student (Mistral) generates a right-padded, a left-padded and an empty row; the
    batch equals Aligner.align_ids_batch on the real rows, does not depend on the thread count, and the student's
    digits (never its <0xHH> duplicates) are paired with the teachers' digits. A teacher cache (which cannot hold
    generated text) is skipped instead of failing the batch."""
    s, q, m = toks
    cache = xt.teacher_cache.build(TinyTeacher(), q, ["2024 had 366 days."], tmp_path / "q", k=4, progress=False)
    collator = xt.Collator(m, [s, q], teacher_caches=[None, cache])
    assert "topk_logprobs" in collator(["2024 had 366 days."])["teachers"][1]
    texts = ["The answer is 42, not 7.", "2024 had 366 days.", ""]
    enc = [m(x)["input_ids"] if x else [] for x in texts]
    W = max(map(len, enc)) + 2
    ids, mask = torch.zeros(3, W, dtype=torch.long), torch.zeros(3, W, dtype=torch.long)
    ids[0, :len(enc[0])], mask[0, :len(enc[0])] = torch.tensor(enc[0]), 1
    ids[1, W - len(enc[1]):], mask[1, W - len(enc[1]):] = torch.tensor(enc[1]), 1
    batch = collator.on_policy(ids, attention_mask=mask, threads=1)
    _same_batch(batch, collator.on_policy(ids, attention_mask=mask, threads=3))
    assert batch["attention_mask"].sum(1).tolist() == [len(e) for e in enc]
    _same_batch(batch, xt.Collator(m, [s, q]).on_policy(ids, attention_mask=mask))
    for j, t in enumerate((s, q)):
        td = batch["teachers"][j]
        assert "topk_logprobs" not in td and "topk_indices" not in td
        t_rows = [td["input_ids"][b][td["attention_mask"][b].bool()].tolist() for b in range(3)]
        assert t_rows == [t(x)["input_ids"] for x in texts]
        ref = xt.Aligner(m, t).align_ids_batch(enc, t_rows, threads=2)
        for name in ("chunks", "chunk_valid", "chunk_correct", "num_chunks", "student_chunk_ids",
                     "teacher_chunk_ids", "student_ids", "teacher_ids"):
            assert torch.equal(getattr(td["alignment"], name), getattr(ref, name)), name
    digits = [(b, p) for b, e in enumerate(enc) for p, i in enumerate(e) if m.decode([i]).strip().isdigit()]
    assert len(digits) == 10 and all(m.convert_ids_to_tokens(enc[b][p]).isdigit() for b, p in digits)
    a = batch["teachers"][1]["alignment"]  # Qwen3 splits digits one by one, like this student
    for b, p in digits:
        k = next(k for k in range(int(a.num_chunks[b])) if a.chunks[b, k, 0] <= p < a.chunks[b, k, 1])
        s0, s1, t0, t1 = a.chunks[b, k].tolist()
        assert (s1 - s0, t1 - t0) == (1, 1) and q.decode(a.teacher_ids[b, t0]) == m.decode(enc[b][p]).strip()
        assert a.chunk_correct[b, k] and a.chunk_valid[b, k] == (t0 > 0)  # teacher token 0: no logit row predicts it
    pairs = valid_pairs(batch, (m, s, q))
    assert pairs and all(same_text(x, y) for *_, x, y, _, _ in pairs)


def test_batch_to_moves_tensors_and_keeps_alignments_on_cpu(toks):
    s, q, _ = toks
    batch = xt.Collator(s, [q])(TEXTS[:1]).to("meta")
    assert batch["input_ids"].device.type == "meta"
    assert batch["teachers"][0]["input_ids"].device.type == "meta"
    assert batch["teachers"][0]["alignment"].chunks.device.type == "cpu"  # the losses plan on the CPU copy


def test_bad_input_is_rejected(toks):
    s, q, _ = toks
    with pytest.raises(TypeError, match="non-empty list"):
        xt.Collator(s, q)
    with pytest.raises(ValueError, match="packing needs max_length"):
        xt.Collator(s, [q], packing=True)
    collator = xt.Collator(s, [q])
    with pytest.raises(ValueError, match="'text', 'prompt'"):
        collator([{"body": "x"}])
    with pytest.raises(TypeError, match="role"):
        collator([{"messages": [{"role": "user"}]}])
    for one in ("hi there", {"text": "hi there"}):  # a str was 8 one-character examples
        with pytest.raises(TypeError, match=r"examples must be a list of examples, got one .*: pass \[example\]"):
            collator(one)
        with pytest.raises(TypeError, match="examples must be a list"):
            collator.teacher_ids(one)
    for kw, exc, msg in [(dict(max_length=1.5), TypeError, "max_length must be an int"),
                         (dict(max_length=True), TypeError, "max_length must be an int"),
                         (dict(max_length=0), ValueError, "max_length must be in"),
                         (dict(pad_to_multiple_of=2.5), TypeError, "pad_to_multiple_of must be an int"),
                         (dict(completion_only="no"), TypeError, "completion_only must be a bool or None"),
                         (dict(packing=1, max_length=8), TypeError, "packing must be a bool"),
                         (dict(threads=-1), ValueError, "threads must be in")]:
        with pytest.raises(exc, match=msg):
            xt.Collator(s, [q], **kw)
    for ex in ("a\ud800b", {"prompt": "a", "completion": "\udfff"},
               {"messages": [{"role": "user", "content": "x\ud800"}]}):
        with pytest.raises(ValueError, match="example 1: its text cannot be encoded as UTF-8"):
            collator(["fine", ex])


# NFD / compatibility forms that Qwen3's NFC normalizer rewrites, and a literal "▁" that SentencePiece reads as a space:
# both encodings' byte offsets point at the same original text, but the tokens hold different bytes
NORMALIZED = ["Cafe\u0301 au lait", "x a\u0308\u0323 b and x \u212b b", "x \u2581 y", "Hello <|endoftext|> world",
              "<|im_start|>user x<|im_end|>"]


def canonical(tok, ids) -> bytes:
    return b"".join(token_table(tok).token_bytes[i] for i in ids)


def test_correct_chunks_hold_equal_canonical_bytes_and_collator_matches_align_batch(toks):
    """chunk_correct means equal canonical bytes (specials: the 1:1 same-role rule), on align_batch and on the
    Collator's raw text alike: equal byte offsets are not enough where a tokenizer normalizes its input."""
    s, q, m = toks
    batch = xt.Collator(s, [q, m])(NORMALIZED)
    flipped = 0
    for td, t in zip(batch["teachers"], (q, m)):
        ref = xt.Aligner(s, t).align_batch(NORMALIZED)
        a = td["alignment"]
        for name in ("chunks", "chunk_valid", "chunk_correct", "num_chunks"):
            assert torch.equal(getattr(a, name), getattr(ref, name)), name
        special = {i for tok in (s, t) for i in tok.all_special_ids}
        for b, k in a.chunk_correct.nonzero().tolist():
            s0, s1, t0, t1 = a.chunks[b, k].tolist()
            si, ti = a.student_ids[b, s0:s1].tolist(), a.teacher_ids[b, t0:t1].tolist()
            if special & {*si, *ti}:  # the specials' rule: a 1:1 pair
                assert len(si) == len(ti) == 1
                continue
            x, y = canonical(s, si), canonical(t, ti)
            first = not a.chunk_correct[b, :k].any()  # SentencePiece's prefix space ("▁x"), dropped as align_ids does
            assert x == y or first and x.lstrip(b" ") == y.lstrip(b" "), (b, k, x, y)
        # the chunks whose offsets coincide but whose bytes differ are now incorrect (and out of the losses)
        for b, text in enumerate(NORMALIZED):
            for k in range(int(a.num_chunks[b])):
                s0, s1, t0, t1 = a.chunks[b, k].tolist()
                x = canonical(s, a.student_ids[b, s0:s1].tolist())
                y = canonical(t, a.teacher_ids[b, t0:t1].tolist())
                flipped += bool(s1 > s0 and t1 > t0 and x in (b"afe\xcc\x81", b"\xe2\x84\xab", b" \xe2\x84\xab")
                                and x != y and not a.chunk_correct[b, k])
    assert flipped >= 2  # Qwen3: "afe" + U+0301 vs "afé" (the mark it composes stays in its chunk), U+212B vs "Å"
    # a text starting with a special's literal: Metaspace (prepend_scheme="first") adds no prefix space after it,
    # so " after" ↔ "▁after" is correct (stripping the teacher's real space would break it)
    chunks, correct = xt.Aligner(s, m).align("<s> after bos", return_correct=True)
    ids = s("<s> after bos")["input_ids"]
    assert any(ok and canonical(s, ids[a:b]) == b" after" for (a, b, _, _), ok in zip(chunks.tolist(), correct))


def test_packing_with_empty_documents_for_a_student_without_bos(toks):
    s, q, _ = toks
    examples = ["hello world", "", "  \n", "Short one."]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        packed = xt.Collator(q, [s], max_length=64, packing=True)(examples)  # Qwen3 adds no BOS: "" is 0 tokens
        unpacked = xt.Collator(q, [s], max_length=64)(examples)
    assert packed["input_ids"].shape[0] == 1
    assert (packed["labels"][:, 1:] >= 0).sum() == (unpacked["labels"][:, 1:] >= 0).sum() > 0  # labels predicted
    a_p, a_u = packed["teachers"][0]["alignment"], unpacked["teachers"][0]["alignment"]
    assert a_p.chunk_valid.sum() == a_u.chunk_valid.sum() > 0


def test_chat_content_a_tokenizer_normalizes_keeps_only_equal_bytes_correct(chat_toks):
    """The chat path marks chunks by the same byte rule as raw text: "afe" (NFD, Llama-3) never pairs with "afé"
    (NFC-normalized Qwen3) as a correct chunk, inside a rendered template."""
    s, q, m = chat_toks
    chat = {"messages": [{"role": "user", "content": "Order Cafe\u0301 au lait, x \u212b b."},
                         {"role": "assistant", "content": "Cafe\u0301 au lait and \u212b it is, x \u2581 y."}]}
    batch = xt.Collator(s, [q, m], completion_only=False)([chat])
    special = {i for tok in chat_toks for i in tok.all_special_ids}
    n_correct = 0
    for td, t in zip(batch["teachers"], (q, m)):
        a = td["alignment"]
        for b, k in a.chunk_correct.nonzero().tolist():
            s0, s1, t0, t1 = a.chunks[b, k].tolist()
            si, ti = a.student_ids[b, s0:s1].tolist(), a.teacher_ids[b, t0:t1].tolist()
            if special & {*si, *ti}:
                assert len(si) == len(ti) == 1
                continue
            x, y = canonical(s, si), canonical(t, ti)
            assert x == y, (k, x, y)
            n_correct += 1
        assert not (a.chunk_valid & ~a.chunk_correct).any()  # include_mismatched=False
    assert n_correct > 10


# Qwen3's assistant branch, reduced: the reasoning in the content moves into a <think> block the template writes
THINK = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% set c = m.content %}"
         "{% set r = '' %}{% if '</think>' in c %}{% set r = c.split('</think>')[0].split('<think>')[-1].strip('\n') %}"
         "{% set c = c.split('</think>')[-1].lstrip('\n') %}{% endif %}<think>\n{{ r }}\n</think>\n\n{{ c }}"
         "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}")
# Qwen3's handling of earlier turns: the reasoning is dropped, the answer left-stripped of newlines
DROP_THINK = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
              "{{ m['content'].split('</think>')[-1].lstrip('\n') }}{% else %}{{ m['content'] }}{% endif %}"
              "<|im_end|>\n{% endfor %}")


def test_chat_template_whose_markup_depends_on_the_content_still_aligns(chat_toks):
    """A template that writes text around a message from its content (the sentinel render has an empty
    <think></think>, the real one the reasoning; or it left-strips newlines) made every earlier message fail to be
    "rendered verbatim": the content is now found in the real render and the text around it is markup."""
    s, q, _ = chat_toks
    msgs = [{"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\nadd two and two\n</think>\n\nIt is 4."},
            {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6."}]
    for template, answers, eot in ((THINK, [msgs[1]["content"], "6."], 2),
                                   (DROP_THINK, ["\nHello there\n"], 1)):
        q.chat_template = template
        ex = {"messages": msgs if template == THINK else [{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": answers[0]}]}
        batch = xt.Collator(s, [q])([ex])
        labels = batch["labels"][0]
        assert s.decode(labels[labels >= 0]) == "".join(a.strip() + "<|eot_id|>" for a in answers)
        pairs = [(x, y) for _, _, x, y, _, _ in valid_pairs(batch, (s, q))]
        assert pairs.count(("<|eot_id|>", "<|im_end|>")) == eot  # every assistant turn's end, nothing else
        content = "".join(x for x, y in pairs if x == y)
        assert all(x == y or (x, y) == ("<|eot_id|>", "<|im_end|>") for x, y in pairs)
        assert "2+2" not in content and "add two" in content if template == THINK else content == "Hello there"
        assert not any("im_start" in y or "header" in x or y.startswith("</think>") for x, y in pairs)
    # Truly unrenderable: earlier reasoning dropped by the template. The error names that message, not message 0.
    ex = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nx\n</think>4"},
                       {"role": "user", "content": "And 3+3?"}]}
    with pytest.raises(ValueError, match="message 1's content neither verbatim nor stripped, and its text around "
                                         "message 1 depends on the content"):
        xt.Collator(s, [q])([ex])


def test_on_policy_without_a_mask_ends_each_row_at_its_first_eos(toks):
    """generate() pads a finished row with EOS when pad_token_id is None (those columns got CE labels) and with
    pad = EOS the real final EOS was masked out: now the first EOS of the completion stays and the rest is padding,
    a leading run of EOS is left padding, and pad tokens other than EOS are padding anywhere."""
    s, q, _ = toks
    eos, bos, x = s.eos_token_id, s.bos_token_id, [15339, 1917, 11, 420, 13]
    pad_eos, pad_other = copy.deepcopy(s), copy.deepcopy(s)
    pad_eos.pad_token = pad_eos.eos_token
    pad_other.pad_token = "<|reserved_special_token_0|>"
    P = 4
    for tok, pad in ((s, eos), (pad_eos, eos), (pad_other, pad_other.pad_token_id)):
        ids = torch.tensor([[pad, pad, bos, x[0], x[1], x[2], eos, pad],       # left-padded prompt, stopped
                            [bos, x[0], x[1], x[2], x[3], x[4], x[0], x[1]],  # ran to the end
                            [bos, eos, x[0], x[1], x[2], eos, pad, pad]])     # an EOS inside the prompt stays
        batch = xt.Collator(tok, [q]).on_policy(ids, prompt_length=P)
        assert batch["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] * 8, [1] * 6 + [0] * 2], tok.pad_token
        labels = batch["labels"]
        assert labels[0, :5].tolist() == [-100, -100, x[1], x[2], eos]
        assert labels[1].tolist() == [-100] * 4 + ids[1, 4:].tolist()
        assert labels[2].tolist() == [-100] * 4 + [x[2], eos, -100, -100]
        t = batch["teachers"][0]
        t_ids = [t["input_ids"][b][t["attention_mask"][b].bool()].tolist() for b in range(3)]
        assert q.decode(t_ids[0][:-1]) == s.decode([x[0], x[1], x[2]])  # the student's specials are skipped
        # A row that ended on EOS gives the teacher its EOS, paired 1:1 with the student's (it was a gap, never
        # distilled); the row that ran to the end gets none.
        al = t["alignment"]
        for b, n in ((0, 5), (2, 6)):
            assert t_ids[b][-1] == q.eos_token_id
            last = int(al.num_chunks[b]) - 1
            assert al.chunks[b, last].tolist() == [n - 1, n, len(t_ids[b]) - 1, len(t_ids[b])]
            assert bool(al.chunk_correct[b, last]) and bool(al.chunk_valid[b, last])
        assert t_ids[1][-1] != q.eos_token_id and q.decode(t_ids[1]) == s.decode(ids[1, 1:].tolist())


def test_on_policy_ends_at_the_generations_eos_whatever_the_padding(toks):
    """A chat prompt's end of turn inside the row does not end it (a first fix cut every chat row there, with a
    distinct pad and prompt_length 0), and the generation still ends at its EOS when generate() padded with another
    token than the tokenizer's pad (Llama-3.1: pad <|finetune_right_pad_id|>, generate pads with EOS)."""
    s, q, _ = toks
    bos, x = s.bos_token_id, [15339, 1917, 11, 420]
    chat = copy.deepcopy(s)
    chat.eos_token, chat.pad_token = "<|eot_id|>", "<|reserved_special_token_0|>"
    eot, pad = chat.eos_token_id, chat.pad_token_id
    rows = torch.tensor([[bos, x[0], eot, x[1], x[2], x[3], eot, pad, pad],   # padded with the pad
                         [bos, x[0], eot, x[1], x[2], eot, eot, eot, eot]])   # padded with EOS
    for tok, P in ((chat, 0), (chat, 3), (s, 0), (s, 3)):  # s: no pad, so generate() pads with EOS (row 1 only)
        ids = torch.where(rows == eot, tok.eos_token_id, rows)[0 if tok is chat else 1:]
        mask = xt.Collator(tok, [q]).on_policy(ids, prompt_length=P)["attention_mask"]
        assert mask.tolist() == ([[1] * 7, [1] * 6 + [0]] if tok is chat else [[1] * 6]), (tok.pad_token, P)


def test_a_completion_cut_away_whole_warns_once(toks):
    """max_length shorter than the prompt left the example no label and no KD chunk, silently: a zero loss."""
    s, q, _ = toks
    long = {"prompt": "Q: " + "what is twelve plus thirty? " * 3, "completion": " 42"}
    collator = xt.Collator(s, [q], max_length=20)
    with pytest.warns(UserWarning, match=r"completion starts past max_length \(20\)") as caught:
        batch = collator([long, PAIRS[0]])
        collator([long])  # once per collator
    assert len([w for w in caught if "completion starts past" in str(w.message)]) == 1
    assert (batch["labels"][0] == -100).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xt.Collator(s, [q], max_length=64)([long, PAIRS[0]])


def test_rows_of_a_mixed_datasets_table_treat_none_as_absent(toks):
    """datasets fills the columns a row lacks with None: {"text": None, "prompt": ..., "completion": ...} is a
    prompt/completion example (it was refused), and a None 'messages' does not hide a text."""
    s, q, _ = toks
    collator = xt.Collator(s, [q])
    rows = [{"text": TEXTS[0], "prompt": None, "completion": None, "messages": None},
            {"text": None, "prompt": PAIRS[0]["prompt"], "completion": PAIRS[0]["completion"], "messages": None}]
    _same_batch(collator(rows), collator([TEXTS[0], PAIRS[0]]))
    with pytest.raises(ValueError, match=r"'messages' \(not None\), got keys \['id'\]"):
        collator([{"text": None, "id": 3}])


def test_pack_plan_refuses_ragged_negative_and_non_int_lengths():
    # a document missing a side left that side's running total unchecked: [[1, 0, 2]] put 4 teacher tokens in 3
    with pytest.raises(ValueError, match=r"lengths\[1\] has 2 sides, lengths\[0\] has 1"):
        pack_plan([[1], [1, 3], [1, 1]], 3)
    for lengths, capacity, exc, msg in [([[-5, 1], [4, 1]], 9, ValueError, r"lengths\[0\]\[0\] must be in \[0, inf\]"),
                                        ([[1.5, 1]], 3, TypeError, r"lengths\[0\]\[0\] must be an int"),
                                        ([[1, True]], 3, TypeError, r"lengths\[0\]\[1\] must be an int"),
                                        ([[]], 3, TypeError, r"lengths\[0\] must be a non-empty list"),
                                        ([[1, 1]], 0, ValueError, r"capacity must be in \[1, inf\]"),
                                        ([[1, 1]], 3.0, TypeError, "capacity must be an int"),
                                        ("ab", 3, TypeError, "lengths must be a list")]:
        with pytest.raises(exc, match=msg):
            pack_plan(lengths, capacity)
    assert pack_plan(np.array([[2, 1], [1, 2]]), np.int64(3)) == [[0, 1]] and pack_plan([], 3) == []


def test_on_policy_refuses_an_empty_batch_and_ids_outside_the_vocabulary(toks):
    s, q, _ = toks
    collator = xt.Collator(s, [q])
    with pytest.raises(ValueError, match="student_ids has no rows"):
        collator.on_policy(torch.zeros(0, 4, dtype=torch.long))
    for bad in (-1, len(s), 2**40):
        with pytest.raises(IndexError, match=rf"student_ids\[1\]: id {bad} at column 2 is out of range"):
            collator.on_policy(torch.tensor([[1, 2, 3], [1, 2, bad]]))
    # padding may hold anything: only the real tokens are checked
    batch = collator.on_policy(torch.tensor([[15339, 1917, -100]]), attention_mask=torch.tensor([[1, 1, 0]]))
    assert batch["input_ids"].tolist() == [[15339, 1917]]
    # narrow integer ids: the range check wrapped len(s) to the dtype (uint8: 128256 % 256 = 0, every id "out of
    # range"; int16: every id >= 128256 - 2^17 = -2816)
    want = collator.on_policy(torch.tensor([[9906, 200, 13]]))["input_ids"]
    for dtype in (torch.int16, torch.int32, torch.uint8):
        ids = torch.tensor([[9906, 200, 13]]) if dtype != torch.uint8 else torch.tensor([[72, 200, 13]])
        got = collator.on_policy(ids.to(dtype))["input_ids"]
        assert got.dtype == torch.long and torch.equal(got, want if dtype != torch.uint8 else ids)


def test_on_policy_keeping_specials_adds_no_second_set(offline_tok):
    """skip_special_tokens=False keeps the student's specials in the decoded text; the teachers' tokenizers added
    their own on top (<|begin_of_text|> twice for a teacher with the student's tokenizer)."""
    s = offline_tok("llama3")
    row = [s.bos_token_id, *s.encode(" It is 42.", add_special_tokens=False), s.eos_token_id]
    collator = xt.Collator(s, [s])
    batch = collator.on_policy(torch.tensor([row]), prompt_length=1, skip_special_tokens=False)
    assert batch["teachers"][0]["input_ids"][0].tolist() == row
    ali = batch["teachers"][0]["alignment"]
    assert bool(ali.chunk_correct[0, :int(ali.num_chunks[0])].all())
    default = collator.on_policy(torch.tensor([row]), prompt_length=1)  # specials dropped, the teacher's own added
    assert default["teachers"][0]["input_ids"][0].tolist() == row
    # a teacher of another family reads the kept specials as text and still gets its own BOS
    q = offline_tok("qwen3")
    q_row = [*q.encode(" It is 42.", add_special_tokens=False), q.eos_token_id]
    kept = xt.Collator(q, [s]).on_policy(torch.tensor([q_row]), prompt_length=1, skip_special_tokens=False)
    assert kept["teachers"][0]["input_ids"][0, 0] == s.bos_token_id


def test_teacher_ids_checks_the_teacher_index_first(toks):
    s, q, m = toks
    collator = xt.Collator(s, [q, m])
    for j in (-1, 2):  # -1 silently gave the last teacher; 2 an IndexError after aligning everything
        with pytest.raises(ValueError, match=r"teacher must be in \[0, 1\]"):
            collator.teacher_ids(["hi"], teacher=j)
    with pytest.raises(TypeError, match="teacher must be an int"):
        collator.teacher_ids(["hi"], teacher=1.0)
    assert collator.teacher_ids(["hi"], teacher=1)[0].tolist() == m("hi")["input_ids"]


def test_teacher_ids_of_preprocessed_rows(toks):
    """Rows holding only preprocess's columns give the ids __call__ collates from them (teacher_ids refused them, so
    the preprocess workflow could not build a teacher cache); a shorter max_length cuts them as it does there."""
    s, q, m = toks
    texts = ["The quick brown fox jumps over the lazy dog.", "hi"]
    collator = xt.Collator(s, [q, m])
    cols = collator.preprocess({"text": texts})
    rows = [{k: v[i] for k, v in cols.items()} for i in range(len(texts))]
    for j in (0, 1):
        got, want = collator.teacher_ids(rows, j), collator.teacher_ids(texts, j)
        assert [x.tolist() for x in got] == [x.tolist() for x in want]
    short = xt.Collator(s, [q, m], max_length=4)
    assert [x.tolist() for x in short.teacher_ids(rows, 1)] == [x.tolist() for x in short.teacher_ids(texts, 1)]
    assert len(short.teacher_ids(rows, 1)[0]) == 4


def test_a_tool_call_message_without_content_is_empty_text(chat_toks):
    """OpenAI / TRL write an assistant message that only calls a tool with content None: its text is empty."""
    s, q, _ = chat_toks
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
                "name": "weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "It is sunny."}]
    batch = xt.Collator(s, [q])([{"messages": msgs}])
    labels = batch["labels"][0]
    assert s.decode(labels[labels >= 0]) == "<|eot_id|>It is sunny.<|eot_id|>"  # both assistant turns' ends
    assert "sunny<|im_end|>" in q.decode(batch["teachers"][0]["input_ids"][0])
    with pytest.raises(TypeError, match="a str 'role' and a str \\(or None\\) 'content'"):
        xt.Collator(s, [q])([{"messages": [{"role": "user", "content": 3}]}])
