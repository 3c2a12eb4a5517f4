"""xt.teacher_cache: build (top-k log-probs in safetensors shards + manifest), resume, checksums, and the Collator
serving the cache to the losses' sparse path (k = V reproduces the dense loss)."""
import itertools
import json
import pickle

import pytest
import torch

import xtoken_ext as xt
from xtoken_ext.teacher_cache import TeacherCacheError
from xtoken_ext.tokenizers import temp_sibling

TEXTS = ["The year 2024 had 366 days.", "def f(x):\n    return x ** 2", "Ünïcödé and 12,345 apples.", "Short.",
         "A somewhat longer sentence about caches, shards and checksums.", "42", "Bonjour à tous !"]
V_T = 61


class TinyTeacher(torch.nn.Module):
    """Causal toy LM over any token ids (hashed into buckets): position p sees tokens <= p only, so right padding
    leaves real positions unchanged."""

    def __init__(self, vocab: int = V_T, buckets: int = 1009, dim: int = 16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.buckets = buckets
        self.emb = torch.nn.Parameter(torch.randn(buckets, dim, generator=g))
        self.head = torch.nn.Parameter(2 * torch.randn(dim, vocab, generator=g))
        self.calls = 0

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        h = self.emb[input_ids % self.buckets].cumsum(1) / torch.arange(1, input_ids.shape[1] + 1)[:, None]
        return h @ self.head


@pytest.fixture(scope="module")
def qwen(offline_tok):
    return offline_tok("qwen3")


def reference_topk(model, ids, k):
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.as_tensor(ids)[None])[0].float(), -1)
    return lp.topk(k, -1)


def test_round_trip_manifest_resume_and_checksums(tmp_path, qwen):
    model = TinyTeacher()
    path = tmp_path / "cache"
    cache = xt.teacher_cache.build(model, qwen, TEXTS, path, k=5, name="tiny", shard_size=3, batch_size=2,
                                   progress=False)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["teacher"] == "tiny" and manifest["k"] == 5 and manifest["dtype"] == "bfloat16"
    assert manifest["tokenizer_fingerprint"] == xt.token_table(qwen).fingerprint == cache.fingerprint
    assert manifest["complete"] and manifest["num_examples"] == len(TEXTS) == len(cache)
    assert [s["num_examples"] for s in manifest["shards"]] == [3, 3, 1]
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"]) and manifest["vocab_size"] == V_T
    for text in TEXTS:
        ids = qwen(text)["input_ids"]
        vals, idx = cache.get(ids)
        ref = reference_topk(model, ids, 5)
        assert vals.dtype == torch.bfloat16 and idx.dtype == torch.int64 and vals.shape == (len(ids), 5)
        assert torch.equal(idx, ref.indices)
        assert torch.equal(vals, ref.values.to(torch.bfloat16))
    # Resume: finished shards are skipped; a missing shard alone is recomputed.
    model.calls = 0
    xt.teacher_cache.build(model, qwen, TEXTS, path, k=5, name="tiny", shard_size=3, batch_size=2, progress=False)
    assert model.calls == 0
    (path / "shard-00001.safetensors").unlink()
    xt.teacher_cache.build(model, qwen, iter(TEXTS), path, k=5, name="tiny", shard_size=3, batch_size=2,
                           progress=False)
    assert model.calls == 2  # 3 examples in batches of 2
    assert json.loads((path / "manifest.json").read_text())["shards"] == manifest["shards"]
    with pytest.raises(TeacherCacheError, match="other settings"):
        xt.teacher_cache.build(model, qwen, TEXTS, path, k=6, name="tiny", shard_size=3, progress=False)
    # Pickles (DataLoader workers) and still serves.
    again = pickle.loads(pickle.dumps(cache))
    assert torch.equal(again.get(qwen(TEXTS[0])["input_ids"])[1], cache.get(qwen(TEXTS[0])["input_ids"])[1])
    with pytest.raises(KeyError, match="no cached teacher output"):
        cache.get([1, 2, 3])
    # Corruption is caught on load.
    shard = path / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(TeacherCacheError, match="checksum"):
        xt.teacher_cache.load(path)


def test_bad_requests(tmp_path, qwen):
    with pytest.raises(ValueError, match="exceeds"):
        xt.teacher_cache.build(TinyTeacher(), qwen, TEXTS[:2], tmp_path / "a", k=V_T + 1, progress=False)
    with pytest.raises(ValueError, match="dtype"):
        xt.teacher_cache.build(TinyTeacher(), qwen, TEXTS[:2], tmp_path / "b", dtype=torch.int8, progress=False)
    with pytest.raises(TeacherCacheError, match="not a teacher cache"):
        xt.teacher_cache.load(tmp_path)
    # max_length=-1 cut every example's last token; 2.5 / True / 0 passed int() or failed later inside islice
    for key, value, exc in (("max_length", -1, ValueError), ("max_length", 0, ValueError), ("k", 2.7, TypeError),
                            ("shard_size", 2.5, TypeError), ("batch_size", True, TypeError), ("k", 0, ValueError)):
        with pytest.raises(exc, match=f"{key} must be"):
            xt.teacher_cache.build(TinyTeacher(), qwen, TEXTS[:2], tmp_path / "c", progress=False, **{key: value})


def test_shorter_rebuild_leaves_no_stale_shards_and_bad_manifests_are_named(tmp_path, qwen):
    """Rebuilding a path with fewer texts (--overwrite) left the longer build's later shards on disk; a corrupt
    manifest gave a JSON error without its path, and a list manifest an AttributeError."""
    path = tmp_path / "cache"
    xt.teacher_cache.build(TinyTeacher(), qwen, TEXTS, path, k=3, shard_size=2, progress=False)
    assert len(list(path.glob("shard-*.safetensors"))) == 4
    xt.teacher_cache.build(TinyTeacher(), qwen, TEXTS[:2], path, k=4, shard_size=2, progress=False, overwrite=True)
    assert [f.name for f in path.glob("shard-*.safetensors")] == ["shard-00000.safetensors"]
    assert len(xt.teacher_cache.load(path)) == 2
    # a shard an interrupted build was writing (its temp file, a whole shard's size) is removed by the next build
    orphan = temp_sibling(path / "shard-00001.safetensors")
    orphan.write_bytes(b"x" * 100)
    xt.teacher_cache.build(TinyTeacher(), qwen, TEXTS[:2], path, k=4, shard_size=2, progress=False)
    assert sorted(f.name for f in path.iterdir()) == ["manifest.json", "shard-00000.safetensors"]
    for body, msg in (("{oops", "not a JSON manifest"), ("[1, 2]", "not a teacher-cache manifest")):
        (path / "manifest.json").write_text(body)
        for call in (lambda: xt.teacher_cache.load(path),
                     lambda: xt.teacher_cache.build(TinyTeacher(), qwen, TEXTS[:2], path, k=4, shard_size=2,
                                                    progress=False)):
            with pytest.raises(TeacherCacheError, match=f"manifest.json: {msg}"):
                call()


def test_build_runs_the_model_in_eval_mode(tmp_path, qwen):
    """A module left in train mode cached dropout noise; build runs it in eval mode and gives its mode back."""
    class Dropped(TinyTeacher):
        def forward(self, input_ids, attention_mask=None):
            return torch.nn.functional.dropout(super().forward(input_ids), 0.5, self.training)

    model = Dropped().train()
    model.frozen = torch.nn.Linear(2, 2).eval()  # a part the user keeps in eval mode stays so
    cache = xt.teacher_cache.build(model, qwen, TEXTS[:2], tmp_path / "c", k=5, dtype=torch.float32, progress=False)
    assert model.training and not model.frozen.training
    ids = qwen(TEXTS[0])["input_ids"]
    ref = reference_topk(model.eval(), ids, 5)
    assert torch.equal(cache.get(ids)[1], ref.indices) and torch.equal(cache.get(ids)[0], ref.values)


@pytest.mark.parametrize("name", ["qwen3", "llama3", "mistral-spm"])
def test_raw_texts_are_tokenized_as_the_collator_does(tmp_path, offline_tok, name):
    """A whitespace-only text is an empty example in the Collator; build tokenized it as it is ([220] for Qwen3), so
    training on the cache raised KeyError. A [1, n] ids row hashed like [n] ids and then failed as a key collision;
    float ids were taken."""
    t = offline_tok(name)
    texts = ["  ", "\n", "\u00a0", "", "hi there"]
    cache = xt.teacher_cache.build(TinyTeacher(), t, texts, tmp_path / "c", k=4, progress=False)
    with pytest.warns(UserWarning, match="empty or whitespace-only text"):  # the collator's own warning
        batch = xt.Collator(offline_tok("gpt2"), [t], teacher_caches=[cache])(texts)
    assert batch["teachers"][0]["topk_logprobs"].shape[0] == len(texts)
    ids = t("hi there")["input_ids"]
    assert cache.get(ids)[0].shape == (len(ids), 4)
    for bad in (torch.tensor([ids]), [float(i) for i in ids]):
        with pytest.raises(TypeError, match="1-D sequence of integers"):
            cache.get(bad)
        with pytest.raises(TypeError, match="1-D sequence of integers"):
            bad in cache  # noqa: B015


@pytest.fixture(scope="module")
def served(tmp_path_factory, offline_tok):
    """A float32 cache at k = V of the teacher over prompt/completion and raw examples, built from the collator's
    own teacher ids, and collators serving it unpacked and packed."""
    s, q = offline_tok("llama3"), offline_tok("qwen3")
    examples = [*TEXTS[:4], {"prompt": "Question: 12 + 30 =", "completion": " 42, of course."}]
    plain = xt.Collator(s, [q], max_length=24)
    model = TinyTeacher()
    cache = xt.teacher_cache.build(model, q, plain.teacher_ids(examples), tmp_path_factory.mktemp("c") / "cache",
                                   k=V_T, dtype=torch.float32, progress=False)
    return s, q, examples, model, cache


def test_sparse_cache_reproduces_the_dense_loss_at_full_k(served):
    s, q, examples, model, cache = served
    batch = xt.Collator(s, [q], max_length=24, teacher_caches=[cache])(examples)
    td = batch["teachers"][0]
    assert td["topk_logprobs"].shape == (*td["input_ids"].shape, V_T) and td["topk_indices"].dtype == torch.int64
    g = torch.Generator().manual_seed(1)
    V_S = 48
    proj = xt.Projection.random(V_S, V_T, seed=3)
    zs = torch.randn(*batch["input_ids"].shape, V_S, generator=g)
    with torch.no_grad():
        zt = model(td["input_ids"], td["attention_mask"])
    ali = td["alignment"]
    assert ali.chunk_valid.sum() > 10
    for fn in (xt.pkl_loss, xt.hkl_loss):
        dense = fn(zs, zt, ali, proj, reduction="sum")
        sparse = fn(zs, td["topk_logprobs"], ali, proj, reduction="sum", teacher_indices=td["topk_indices"])
        torch.testing.assert_close(sparse, dense, rtol=2e-5, atol=1e-5)


def test_packed_batches_serve_each_documents_rows(served):
    s, q, examples, _, cache = served
    batch = xt.Collator(s, [q], max_length=24, packing=True, teacher_caches=[cache])(examples)
    td = batch["teachers"][0]
    assert td["input_ids"].shape[0] < len(examples)
    served_docs = 0
    for r in range(td["input_ids"].shape[0]):
        cu = td["cu_seqlens"][r].tolist()
        for a, b in itertools.pairwise(cu):
            if b > a:
                vals, idx = cache.get(td["input_ids"][r, a:b])
                assert torch.equal(td["topk_logprobs"][r, a:b], vals) and torch.equal(td["topk_indices"][r, a:b], idx)
                served_docs += 1
    assert served_docs == len(examples)


def test_collator_rejects_a_cache_of_another_tokenizer(served, offline_tok):
    s, _, _, _, cache = served
    with pytest.raises(ValueError, match="different tokenizer"):
        xt.Collator(s, [offline_tok("gpt2")], teacher_caches=[cache])


def test_cli_builds_a_cache_from_a_saved_model(tmp_path, offline_tok, capsys):
    """`xtoken teacher-cache MODEL_DIR texts.jsonl -o DIR`: a real transformers model (a tiny random GPT-2 saved to
    a folder) over a .jsonl file; the stored top-k equal the model's own log-probs; other settings need --overwrite."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from xtoken_ext.cli import main

    tok = offline_tok("gpt2")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2)).eval()
    model.save_pretrained(tmp_path / "teacher")
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:3]))
    assert main(["teacher-cache", str(tmp_path / "teacher"), str(tmp_path / "texts.jsonl"), "-o",
                 str(tmp_path / "cache"), "-k", "5", "--tokenizer", "offline:gpt2", "--dtype", "float32"]) == 0
    cache = xt.teacher_cache.load(tmp_path / "cache")
    assert len(cache) == 3 and cache.k == 5
    ids = tok(TEXTS[0])["input_ids"]
    lp, idx = cache.get(ids)
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1).topk(5, -1)
    torch.testing.assert_close(lp, want.values, rtol=1e-5, atol=1e-5)
    assert torch.equal(idx, want.indices)
    # other settings at the same folder: refused (one line, exit 2) unless --overwrite
    argv = ["teacher-cache", str(tmp_path / "teacher"), str(tmp_path / "texts.jsonl"), "-o", str(tmp_path / "cache"),
            "-k", "4", "--tokenizer", "offline:gpt2", "--dtype", "float32"]
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err and xt.teacher_cache.load(tmp_path / "cache").k == 5
    assert main([*argv, "--overwrite"]) == 0
    assert xt.teacher_cache.load(tmp_path / "cache").k == 4


def test_cli_text_file_errors_come_before_the_model_loads(tmp_path, capsys):
    """A bad .jsonl line, a line without the field and a file without a text are named in one line (exit 2); the
    model path does not exist, so each error came before loading it."""
    from xtoken_ext.cli import main

    files = {"bad.jsonl": '{"text": "a"}\n{oops\n', "field.jsonl": '{"text": "a"}\n{"body": "b"}\n',
             "empty.txt": "\n  \n", "empty.jsonl": ""}
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    for name, msg in (("bad.jsonl", "bad.jsonl:2: not a JSON line"), ("field.jsonl", "field.jsonl:2: no text field"),
                      ("empty.txt", "no text in it"), ("empty.jsonl", "no text in it")):
        assert main(["teacher-cache", str(tmp_path / "no-model"), str(tmp_path / name), "-o", str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("xtoken teacher-cache: error: ") and msg in err, err


def test_a_single_cache_or_one_without_width_gets_a_clear_error(tmp_path, offline_tok, qwen):
    """A cache path given unwrapped was iterated (a str by characters: a one-character path passed); a cache of
    empty examples only records no width and the error asked for the cache= already given."""
    cache = xt.teacher_cache.build(TinyTeacher(), qwen, ["hi"], tmp_path / "c", k=4, progress=False)
    s = offline_tok("llama3")
    for single in ("c", tmp_path / "c", cache):
        with pytest.raises(TypeError, match="wrap a single one"):
            xt.Collator(s, [qwen], teacher_caches=single)
    empty = xt.teacher_cache.build(TinyTeacher(), qwen, ["", "  "], tmp_path / "e", k=4, progress=False)
    assert empty.vocab_size is None
    d = xt.Distiller(s, [xt.Teacher(None, qwen, loss="pkl", cache=empty)])
    with pytest.warns(UserWarning, match="empty or whitespace-only"):
        batch = d.collator()(["", " "])
    with pytest.raises(ValueError, match="its cache holds no token rows, so it records none: pass vocab_size="):
        d(torch.randn(*batch["input_ids"].shape, len(s)), batch)
