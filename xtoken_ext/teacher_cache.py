"""Offline teacher cache: run a teacher over a dataset once and keep its top-k next-token log-probs, so training
needs no teacher in memory (the losses' sparse path: ``teacher_logits=<top-k log-probs>, teacher_indices=<ids>``).

A cache is a directory::

    manifest.json            format, version, teacher name, tokenizer fingerprint, vocab_size, k, dtype, max_length,
                             shard_size, shards [{file, sha256, num_examples, num_tokens}], num_examples, complete
    shard-00000.safetensors  keys uint8 [n, 16]   (blake2b-128 of each example's token ids, int64 little-endian)
                             offsets int64 [n+1]  (example e owns token rows offsets[e]:offsets[e+1])
                             ids int32 [N]        (the teacher's token ids)
                             indices int32 [N, k], values bf16 | fp16 | fp32 [N, k]  (top-k log-probs, descending)

Row p of an example is the teacher's distribution for token p+1 (the logit row that predicts it), like the dense
logits the losses take. Examples are looked up by their token ids, so a cache serves any order or subset of the data.
``build`` is resumable: the manifest is rewritten after every shard, and a rerun skips shards whose file checksum and
keys match. ``load`` verifies every shard's SHA-256 against the manifest.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .alignment import _check_int
from .tokenizers import load_tokenizer, save_tensors, temp_sibling, token_table

__all__ = ["build", "load", "TeacherCache", "TeacherCacheError", "ids_key"]

FORMAT, VERSION, MANIFEST = "xtoken-teacher-cache", 1, "manifest.json"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_ROW_BLOCK = 512  # rows per log-softmax/top-k step: bounds the fp32 [rows, V] temporary


class TeacherCacheError(ValueError):
    """A cache that does not match its manifest, the request, or the data it is resumed on."""


def _id_array(ids) -> np.ndarray:
    """One example's token ids: 1-D integers (a [1, n] row or float ids would hash like [n] ints, then differ)."""
    a = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise TypeError(f"an example's ids must be a 1-D sequence of integers, got shape {a.shape} dtype {a.dtype}")
    return a


def ids_key(ids) -> bytes:
    """16-byte digest of a token-id sequence (the cache's lookup key)."""
    return hashlib.blake2b(np.ascontiguousarray(_id_array(ids), dtype="<i8").tobytes(), digest_size=16).digest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, obj) -> None:
    tmp = temp_sibling(path)
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)  # atomic: an interrupted build leaves the previous manifest


def _read_manifest(folder: Path) -> dict:
    try:
        m = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise TeacherCacheError(f"{folder} has no {MANIFEST}; not a teacher cache") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TeacherCacheError(f"{folder / MANIFEST}: not a JSON manifest ({e})") from None
    if not isinstance(m, dict) or not isinstance(m.get("shards"), list):
        raise TeacherCacheError(f"{folder / MANIFEST}: not a teacher-cache manifest (no list of shards)")
    return m


def _as_ids(tok, ex, max_length) -> np.ndarray:
    """A text is tokenized with the tokenizer's specials (as the Collator does for raw text, which makes a
    whitespace-only text an empty example); ids pass through."""
    if isinstance(ex, str):
        ids = np.asarray(tok(ex if ex.strip() else "", add_special_tokens=True)["input_ids"], dtype=np.int64)
    else:
        ids = _id_array(ex).astype(np.int64)
    return ids[:max_length]


@contextlib.contextmanager
def _eval_mode(model):
    """``model`` in eval mode, then every submodule back in its own mode (a user's frozen eval() parts stay so)."""
    modes = {m: m.training for m in model.modules()} if isinstance(model, torch.nn.Module) else {}
    for m in modes:
        m.training = False
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def _device_of(model, device):
    if device is not None:
        return torch.device(device)
    p = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    return p.device if p is not None else torch.device("cpu")


@torch.inference_mode()
def _topk(model, ids_list: list[np.ndarray], k: int, dtype, batch_size: int, device):
    """Top-k log-probs per token of every sequence -> (values [n, k] dtype, indices [n, k] int32, V)."""
    out, V = [], None
    for i in range(0, len(ids_list), batch_size):
        part = ids_list[i:i + batch_size]
        L = max(len(x) for x in part)
        if L == 0:
            out += [None] * len(part)
            continue
        x = torch.zeros(len(part), L, dtype=torch.long)
        mask = torch.zeros(len(part), L, dtype=torch.long)
        for b, ids in enumerate(part):
            x[b, :len(ids)] = torch.from_numpy(ids)
            mask[b, :len(ids)] = 1
        res = model(input_ids=x.to(device), attention_mask=mask.to(device))
        logits = res.logits if hasattr(res, "logits") else res
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != x.shape:
            raise TypeError("the teacher must return logits [B, T, V] (a tensor or an object with .logits)")
        V = logits.shape[-1]
        if k > V:
            raise ValueError(f"k={k} exceeds the teacher's vocabulary width {V}")
        for b, ids in enumerate(part):
            vals, idx = [], []
            for r in range(0, len(ids), _ROW_BLOCK):
                lp = torch.log_softmax(logits[b, r:min(r + _ROW_BLOCK, len(ids))].float(), dim=-1)
                v, j = lp.topk(k, dim=-1)
                vals.append(v.to(dtype).cpu())
                idx.append(j.to(torch.int32).cpu())
            out.append((torch.cat(vals), torch.cat(idx)) if vals else None)
    return [(o if o is not None else (torch.zeros(0, k, dtype=dtype), torch.zeros(0, k, dtype=torch.int32)))
            for o in out], V


def _shard_keys(path: Path) -> np.ndarray:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("keys").numpy()


def build(model, tokenizer, data, path, *, k: int = 64, dtype=torch.bfloat16, name: str | None = None,
          max_length: int | None = None, batch_size: int = 8, shard_size: int = 1024, device=None,
          progress: bool = True, overwrite: bool = False) -> TeacherCache:
    """Run ``model`` over ``data`` once and store its top-``k`` log-probs under the directory ``path``.

    ``model(input_ids=, attention_mask=)`` returns logits [B, T, V] (a tensor or an HF output with ``.logits``); put it
    on its device first. It runs in eval mode (a module in train mode would cache dropout noise) and gets its mode
    back. ``data``: an iterable (a list, a ``datasets.Dataset`` column, a generator)
    of texts — tokenized with ``tokenizer``'s specials and cut to ``max_length`` — or of token-id sequences (for chat
    or prompt/completion data pass ``collator.teacher_ids(examples, j)`` so the ids are exactly the collator's).
    ``dtype``: bfloat16 (default), float16 or float32 values. Resumable: rerunning with the same settings skips
    finished shards (checked by SHA-256 and keys); other settings need ``overwrite=True``. Returns the loaded cache."""
    tok = load_tokenizer(tokenizer)
    for key, value in (("k", k), ("shard_size", shard_size), ("batch_size", batch_size), ("max_length", max_length)):
        if value is not None or key != "max_length":  # max_length=-1 cut every example's last token (ids[:-1])
            _check_int(value, key, 1, None)
    dtype_name = next((n for n, d in _DTYPES.items() if d == dtype), None)
    if dtype_name is None:
        raise ValueError(f"dtype must be one of {list(_DTYPES.values())}, got {dtype}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "version": VERSION, "teacher": name or getattr(tok, "name_or_path", "") or "",
              "tokenizer_fingerprint": token_table(tok).fingerprint, "k": int(k), "dtype": dtype_name,
              "max_length": max_length, "shard_size": int(shard_size)}
    done, vocab = {}, None
    if (path / MANIFEST).exists() and not overwrite:
        old = _read_manifest(path)
        diff = {key: (old.get(key), v) for key, v in config.items() if old.get(key) != v}
        if diff:
            raise TeacherCacheError(f"{path} holds a cache built with other settings {diff} (old, new); pass "
                                    "overwrite=True (xtoken teacher-cache --overwrite) or another path")
        done, vocab = {s["file"]: s for s in old["shards"]}, old.get("vocab_size")
    manifest = {**config, "vocab_size": vocab, "shards": [], "num_examples": 0, "complete": False}
    device = _device_of(model, device)
    total = len(data) if hasattr(data, "__len__") else None
    it = iter(data)
    with tqdm(total=total, unit="ex", desc=f"teacher cache {config['teacher']}".strip(), disable=not progress) as bar, \
            _eval_mode(model):
        for index in itertools.count():
            examples = list(itertools.islice(it, shard_size))
            if not examples:
                break
            ids = [_as_ids(tok, ex, max_length) for ex in examples]
            keys = np.frombuffer(b"".join(ids_key(x) for x in ids), dtype=np.uint8).reshape(-1, 16)
            file = path / f"shard-{index:05d}.safetensors"
            prev = done.get(file.name)
            if not (prev and file.exists() and _sha256(file) == prev["sha256"]
                    and np.array_equal(_shard_keys(file), keys)):
                topk, V = _topk(model, ids, int(k), dtype, int(batch_size), device)
                if V is not None:
                    if manifest["vocab_size"] not in (None, V):
                        raise TeacherCacheError(f"the teacher's width changed: {manifest['vocab_size']} -> {V}")
                    manifest["vocab_size"] = V
                lens = torch.tensor([len(x) for x in ids], dtype=torch.int64)
                tensors = {"keys": torch.from_numpy(keys.copy()),
                           "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]),
                           "ids": torch.from_numpy(np.concatenate(ids).astype(np.int32)),
                           "values": torch.cat([t[0] for t in topk]).contiguous(),
                           "indices": torch.cat([t[1] for t in topk]).contiguous()}
                tmp = temp_sibling(file)
                save_tensors(tensors, tmp, metadata={"format": FORMAT})
                os.replace(tmp, file)
                prev = {"file": file.name, "sha256": _sha256(file), "num_examples": len(ids),
                        "num_tokens": int(lens.sum())}
            manifest["shards"].append(prev)
            manifest["num_examples"] += len(ids)
            _write_json(path / MANIFEST, manifest)
            bar.update(len(ids))
    manifest["complete"] = True
    _write_json(path / MANIFEST, manifest)
    kept = {s["file"] for s in manifest["shards"]}
    for file in path.glob("shard-*.safetensors"):  # shards of a longer earlier build at this path
        if file.name not in kept:
            file.unlink()
    for file in path.glob("shard-*.safetensors.*.tmp"):  # shards an interrupted build was writing
        file.unlink(missing_ok=True)
    return load(path)


def load(path, *, verify: bool = True, allow_incomplete: bool = False) -> TeacherCache:
    """Open a cache directory; ``verify`` checks every shard's SHA-256 against the manifest."""
    return TeacherCache(path, verify=verify, allow_incomplete=allow_incomplete)


class TeacherCache:
    """Read side of a cache: ``get(ids)`` -> (top-k log-probs [n, k] in the stored dtype, indices int64 [n, k]).
    Pickles without its open file handles (DataLoader workers reopen the shards)."""

    def __init__(self, path, *, verify: bool = True, allow_incomplete: bool = False):
        self.path = Path(path)
        self.manifest = m = _read_manifest(self.path)
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise TeacherCacheError(f"{self.path}: unknown format {m.get('format')!r} version {m.get('version')!r}")
        if not m["complete"] and not allow_incomplete:
            raise TeacherCacheError(f"{self.path}: the build did not finish ({m['num_examples']} examples so far); "
                                    "rerun build to resume, or pass allow_incomplete=True")
        self._index: dict[bytes, tuple[int, int]] = {}
        self._offsets: list[np.ndarray] = []
        for s, shard in enumerate(m["shards"]):
            file = self.path / shard["file"]
            if not file.exists():
                raise TeacherCacheError(f"{file} is missing")
            if verify and _sha256(file) != shard["sha256"]:
                raise TeacherCacheError(f"{file}: checksum mismatch (corrupted or modified)")
            with safe_open(str(file), framework="pt") as f:
                keys = f.get_tensor("keys").numpy()
                self._offsets.append(f.get_tensor("offsets").numpy())
            for e, key in enumerate(keys):
                self._index[key.tobytes()] = (s, e)
        self._handles: dict = {}

    k = property(lambda self: int(self.manifest["k"]))
    dtype = property(lambda self: _DTYPES[self.manifest["dtype"]])
    fingerprint = property(lambda self: self.manifest["tokenizer_fingerprint"])
    vocab_size = property(lambda self: self.manifest["vocab_size"])
    teacher = property(lambda self: self.manifest["teacher"])

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, ids) -> bool:
        return ids_key(ids) in self._index

    def __repr__(self) -> str:
        m = self.manifest
        return (f"TeacherCache({str(self.path)!r}, teacher={m['teacher']!r}, examples={len(self)}, k={m['k']}, "
                f"dtype={m['dtype']})")

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}

    def get(self, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached (log-probs [n, k], indices int64 [n, k]) of the example with exactly these token ids."""
        try:
            s, e = self._index[ids_key(ids)]
        except KeyError:
            raise KeyError(f"no cached teacher output for these {len(ids)} token ids; the cache was built from other "
                           "data, tokenization or truncation (use Collator.teacher_ids to build it)") from None
        f = self._handles.get(s)
        if f is None:
            f = self._handles[s] = safe_open(str(self.path / self.manifest["shards"][s]["file"]), framework="pt")
        a, b = (int(x) for x in self._offsets[s][e:e + 2])
        stored = f.get_slice("ids")[a:b]
        if not torch.equal(stored.long(), torch.as_tensor(_id_array(ids)).long()):
            raise TeacherCacheError("cache key collision: stored ids differ from the requested ones")
        return f.get_slice("values")[a:b], f.get_slice("indices")[a:b].long()
