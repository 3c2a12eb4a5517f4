"""Training batches for cross-tokenizer distillation: one student side and, per teacher, its ids and ``Alignment``.

``Collator`` takes raw texts, prompt/completion pairs or chat messages (each tokenizer renders its own chat
template) and returns a ``Batch``: the student's padded ``input_ids``/``attention_mask``/``labels`` and, under
``"teachers"``, one dict per teacher with its ``input_ids``, ``attention_mask`` and ``alignment`` (plus
``topk_logprobs``/``topk_indices`` when an offline teacher cache is attached). It can pack several documents into one
row in lockstep for every side, precompute everything in ``datasets.map`` (``Collator.preprocess``), and align
student-generated ids for on-policy distillation (``Collator.on_policy``).

How chunks are found. Each example is rendered per tokenizer (the same text for raw and prompt/completion examples,
each tokenizer's own template for chat) and described as byte segments of that text: *shared* segments (the text, a
message's content) whose bytes are the same on every side, and *markup* (template text such as
``<|im_start|>user\\n``) that differs between families. Per student/teacher pair, token byte offsets are mapped to one
common coordinate — shared segments keep their bytes, markup collapses to a point — and the C++ offset merge closes a
chunk wherever both sides' ends coincide. So markup tokens become gaps, a token that straddles markup and content
makes its chunk incorrect, and the special token that closes a message (``<|eot_id|>``, ``<|im_end|>``,
``<end_of_turn>``, ``</s>`` ...) gets one common byte on both sides: end of turn is paired 1:1 by role and distilled
(W maps the two ids; DESIGN.md §2). When both sides render the same text, the plain offset merge is used.

Completion-only examples count only the completion (CE labels and KD chunks): a chunk counts when every token on
both sides lies inside the completion (or is the end-of-turn token closing a completion message); a chunk crossing
the prompt/completion boundary does not count.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import teacher_cache
from .alignment import Aligner, Alignment, _check_int, _check_threads, _check_utf8
from .tokenizers import _ASCII_SPACE, EOT, NORMAL, encode_batch_with_offsets, load_tokenizer, token_table

__all__ = ["Collator", "Batch", "pack_plan", "teacher_cache"]

_PRE = "xt_"  # prefix of the columns written by Collator.preprocess
IGNORE_INDEX = -100


class Batch(dict):
    """The collator's output. Student: ``input_ids``, ``attention_mask``, ``labels`` [B, T_S] (and, when packed,
    ``position_ids`` [B, T_S] and ``cu_seqlens`` int32 [B, D+1]); ``teachers``: one dict per teacher with
    ``input_ids``, ``attention_mask``, ``alignment`` (an ``xt.Alignment`` against the student side), the packed
    fields, and ``topk_logprobs``/``topk_indices`` [B, T_T, k] when the teacher is served from a cache.
    ``.to(device)`` moves every tensor and leaves the alignments on the CPU: the losses move the few index tensors
    they need and plan on the CPU copy, with no host sync (Accelerate / Trainer call ``.to`` on every batch)."""

    def to(self, device, non_blocking: bool = False) -> Batch:
        def move(x):
            if isinstance(x, torch.Tensor):
                return x.to(device, non_blocking=non_blocking)
            if isinstance(x, Mapping):
                return {k: move(v) for k, v in x.items()}
            if isinstance(x, list):
                return [move(v) for v in x]
            return x

        return Batch(move(dict(self)))


# -- rendering: text of one side + its byte segments ------------------------------------------------------------------
@dataclass
class _Rendered:
    text: str
    add_special: bool     # tokenize with the tokenizer's own BOS/EOS (raw text) or not (a chat template adds them)
    seg: np.ndarray       # int64 [S, 2] byte ranges tiling the text, in order
    shared: np.ndarray    # bool [S]: same bytes on every side (text, message content)
    comp: np.ndarray      # bool [S]: inside the completion (content of a completion message / the markup closing it)
    closes: np.ndarray    # bool [S]: markup right after a message (its first special token is the end of turn)


def _segments(pieces: list[tuple[str, bool, bool, bool]], add_special: bool) -> _Rendered:
    """pieces: (text, shared, comp, closes) in order."""
    lens = [len(p[0].encode("utf-8")) for p in pieces]
    ends = np.cumsum(lens, dtype=np.int64)
    seg = np.stack([ends - np.asarray(lens, dtype=np.int64), ends], 1) if pieces else np.zeros((0, 2), np.int64)
    flags = [np.array([p[i] for p in pieces], dtype=bool) for i in (1, 2, 3)]
    return _Rendered("".join(p[0] for p in pieces), add_special, seg.reshape(-1, 2), *flags)


def _parse(ex, i: int):
    """-> ("text", prompt, completion) or ("chat", messages, completion flags per message); every text valid UTF-8."""
    p = _parse_kind(ex, i)
    for text in (p[1], p[2]) if p[0] == "text" else (m["content"] for m in p[1]):
        _check_utf8(text, f"example {i}: its text")
    return p


def _parse_kind(ex, i: int):
    if isinstance(ex, str):
        return "text", "", ex
    if not isinstance(ex, Mapping):
        raise TypeError(f"example {i}: expected a str or a dict, got {type(ex).__name__}")
    # A datasets table mixing kinds fills the columns a row lacks with None: such a key is absent.
    ex = {k: v for k, v in ex.items() if v is not None}
    if "messages" in ex:
        msgs = _check_messages(ex["messages"], i)
        return "chat", msgs, [m["role"] == "assistant" for m in msgs]
    if "prompt" in ex and "completion" in ex:
        p, c = ex["prompt"], ex["completion"]
        if isinstance(p, str) and isinstance(c, str):
            return "text", p, c
        if isinstance(p, list) and isinstance(c, list):  # conversational prompt/completion (TRL's format)
            p, c = _check_messages(p, i), _check_messages(c, i)
            return "chat", p + c, [False] * len(p) + [True] * len(c)
        raise TypeError(f"example {i}: prompt and completion must both be str or both be lists of messages")
    if "text" in ex:
        if not isinstance(ex["text"], str):
            raise TypeError(f"example {i}: 'text' must be str, got {type(ex['text']).__name__}")
        return "text", "", ex["text"]
    raise ValueError(f"example {i}: expected a str or a dict with 'text', 'prompt' + 'completion' or 'messages' (not "
                     f"None), got keys {sorted(ex)}")


def _check_messages(msgs, i: int) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise TypeError(f"example {i}: messages must be a non-empty list of {{'role', 'content'}} dicts")
    for m in msgs:
        if not (isinstance(m, Mapping) and isinstance(m.get("role"), str) and "content" in m
                and (m["content"] is None or isinstance(m["content"], str))):
            raise TypeError(f"example {i}: every message needs a str 'role' and a str (or None) 'content', got {m!r}")
    # content None: an assistant message that only calls tools (OpenAI / TRL); its text is empty
    return [{**m, "content": m["content"] or ""} for m in msgs]


def _render_chat(tok, messages: list[dict], comp: list[bool], kwargs: dict, i: int) -> _Rendered:
    """Render with the tokenizer's own template and locate every message's content in the result. A render with
    sentinel contents gives the markup expected between messages; normally the real contents (verbatim, or stripped
    when the template trims them) sit exactly between those markups. Templates whose text around a message depends on
    its content (Qwen3 moves a ``<think>`` block out of the content, ``content.lstrip('\\n')``) break that framing:
    then the content is searched in the real render, in order, and the text in between is markup (never counted)."""
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tok, 'name_or_path', '') or type(tok).__name__!r} has no chat template; "
                         "set tokenizer.chat_template (a Jinja string) before passing chat messages")
    sentinels = [f"\ue000xtoken{j}\ue001" for j in range(len(messages))]
    skeleton = tok.apply_chat_template([{**m, "content": s} for m, s in zip(messages, sentinels)], tokenize=False,
                                       **kwargs)
    full = tok.apply_chat_template(messages, tokenize=False, **kwargs)
    markup, pos = [], 0
    for j, s in enumerate(sentinels):
        at = skeleton.find(s, pos)
        if at < 0 and not messages[j]["content"]:  # an empty message the template leaves out (Llama-3.1 renders a
            # tool-calling turn from its tool_calls alone): the text up to the next message is markup before it
            at = min([a for a in (skeleton.find(x, pos) for x in sentinels[j + 1:]) if a >= 0] or [len(skeleton)])
            markup.append(skeleton[pos:at])
            pos = at
            continue
        if at < 0 or skeleton.find(s, at + 1) >= 0:
            raise ValueError(f"example {i}: the chat template of {type(tok).__name__} does not render message {j} "
                             "exactly once; messages it drops or repeats cannot be aligned")
        markup.append(skeleton[pos:at])
        pos = at + len(s)
    markup.append(skeleton[pos:])
    pieces, pos = [], 0
    for j, m in enumerate(messages):
        text = m["content"]
        found = _framed(full, pos, markup[j], markup[j + 1], text) or _nearest(full, pos, markup[j], text)
        if found is None:
            raise ValueError(f"example {i}: the chat template of {type(tok).__name__} renders message {j}'s content "
                             f"neither verbatim nor stripped, and its text around message {j} depends on the content; "
                             "cannot locate it")
        at, content = found
        pieces.append((full[pos:at], False, j > 0 and comp[j - 1], j > 0))
        # Only the stripped core is shared: templates differ in trimming (Llama-3's `| trim`, ChatML keeps it).
        core = content.strip()
        lead = content[:len(content) - len(content.lstrip())]
        pieces += [(lead, False, comp[j], False), (core, True, comp[j], False),
                   (content[len(lead) + len(core):], False, comp[j], False)]
        pos = at + len(content)
    pieces.append((full[pos:], False, comp[-1], True))
    return _segments(pieces, add_special=False)


def _variants(content: str) -> list[str]:
    """The forms a template may render a content in: verbatim, or trimmed on either or both sides (longest first)."""
    return list(dict.fromkeys((content, content.lstrip(), content.rstrip(), content.strip())))


def _framed(full: str, pos: int, before: str, after: str, content: str) -> tuple[int, str] | None:
    """(start, rendered form) of a content framed exactly by the sentinel render's markup, or None."""
    if not full.startswith(before, pos):
        return None
    at = pos + len(before)
    for c in _variants(content):
        if full.startswith(c, at) and full.startswith(after, at + len(c)):
            return at, c
    return None


def _nearest(full: str, pos: int, before: str, content: str) -> tuple[int, str] | None:
    """The occurrence of the content (any form) after ``pos`` whose preceding text is closest to the expected markup
    ``before`` (so a short content is not taken from inside a role name), or None when it does not occur. Distance:
    the characters outside the common prefix and suffix of the two markups (a content-dependent template changes
    one stretch of them); it is at least the length difference, which bounds the search."""
    best = None  # (distance, start, -len(form)), form
    for c in _variants(content):
        at = full.find(c, pos)
        while at >= 0:
            seen = full[pos:at]
            if best is not None and len(seen) - len(before) > best[0][0]:
                break  # every later occurrence is farther still
            n = min(len(seen), len(before))
            k = n if seen == before else next((x for x in range(n) if seen[x] != before[x]), n)
            k += next((x for x in range(n - k) if seen[-1 - x] != before[-1 - x]), n - k)
            key = (len(seen) + len(before) - 2 * k, at, -len(c))
            if best is None or key < best[0]:
                best = key, c
            at = full.find(c, at + 1)
    return None if best is None else (best[0][1], best[1])


# -- one side encoded --------------------------------------------------------------------------------------------------
@dataclass
class _Side:
    r: _Rendered
    ids: np.ndarray       # int64 [n]
    starts: np.ndarray    # byte offsets into r.text
    ends: np.ndarray
    eot: np.ndarray       # int64 [S]: token closing the message before segment j (a special at its start), -1 none
    inside: np.ndarray    # bool [n]: token lies inside one shared segment (width > 0)
    comp: np.ndarray      # bool [n]: token counts (CE label, KD)


def _side(r: _Rendered, ids, starts, ends, table, completion_only: bool) -> _Side:
    n, S = len(ids), len(r.seg)
    raw = r.text.encode("utf-8")
    closer = table.roles[ids] != NORMAL  # a special can end a turn (GLM's turn ends on the next role's <|user|>)

    def space(lo, hi):  # only whitespace in raw[lo:hi]
        return not raw[lo:hi].strip(_ASCII_SPACE)

    eot = np.full(S, -1, dtype=np.int64)
    lead: list[int] = []  # whitespace tokens a template writes before a completion's end of turn (' ' + eos_token)
    for j in np.flatnonzero(r.closes):
        lo, hi = r.seg[j]
        k = int(np.searchsorted(starts, lo, "left"))
        while k < n and starts[k] == lo and ends[k] == lo:  # skip zero-width tokens at the same place
            k += 1
        pos, ws = lo, []
        while k < n and starts[k] == pos and pos < ends[k] <= hi and not closer[k] and space(pos, ends[k]):
            ws, pos, k = ws + [k], ends[k], k + 1
        if k < n and starts[k] == pos and closer[k] and ends[k] <= hi:
            eot[j] = k
            lead += ws if r.comp[j] else []
    j = np.clip(np.searchsorted(r.seg[:, 0], starts, "right") - 1, 0, S - 1)  # segment of each token's start
    inside = r.shared[j] & (ends <= r.seg[j, 1]) & (ends > starts)
    if completion_only:
        # A token that reaches into a segment over whitespace only is labelled with it (Llama-2's "[/INST] " +
        # "Four." gives "▁Four", the answer's first word); KD keeps `inside`: where the two renderings differ, its
        # bytes are not the content's.
        last = np.clip(np.searchsorted(r.seg[:, 0], ends - 1, "right") - 1, 0, S - 1)  # segment of its last byte
        inside_ws = inside.copy()
        for k in np.flatnonzero((last > j) & (ends > starts)):
            if r.shared[last[k]] and space(starts[k], r.seg[last[k], 0]):
                j[k], inside_ws[k] = last[k], True
        comp = inside_ws & r.comp[j]
        if r.add_special and r.text.strip() and r.comp[-1]:  # the tokenizer's own EOS after a completion
            comp |= (starts == len(raw)) & (ends == len(raw)) & closer
        closing = np.flatnonzero(r.comp & (eot >= 0))
        comp[eot[closing]] = True
        comp[lead] = True
    else:
        comp = np.ones(n, dtype=bool)
    return _Side(r, ids, starts, ends, eot, inside, comp)


def _encode(tok, rendered: list[_Rendered], completion_only: list[bool]) -> list[_Side]:
    table = token_table(tok)
    out: list[_Side | None] = [None] * len(rendered)
    for add in (True, False):  # raw texts keep the tokenizer's specials; chat templates write their own
        idx = [i for i, r in enumerate(rendered) if r.add_special == add]
        if idx:
            enc = encode_batch_with_offsets(tok, [rendered[i].text for i in idx], add_special_tokens=add)
            for i, (ids, st, en) in zip(idx, enc):
                out[i] = _side(rendered[i], ids, st, en, table, completion_only[i])
    return out


# -- one student/teacher pair ------------------------------------------------------------------------------------------
def _to_common(pos, seg, shared, paired, base, eot_end):
    """Byte positions of one side -> common coordinate: shared segments keep their bytes, markup is a point (or
    one byte, ending with the paired end-of-turn token). A boundary position belongs to the later segment."""
    j = np.clip(np.searchsorted(seg[:, 0], pos, "right") - 1, 0, len(seg) - 1)
    return np.where(shared[j], base[j] + pos - seg[j, 0], base[j] + (paired[j] & (pos >= eot_end[j])))


def _common(s: _Side, t: _Side):
    """Both sides' token offsets in one coordinate + per-token "dirty" flags (a token with width there that is
    neither inside one shared segment nor a paired end-of-turn token)."""
    if s.r.text == t.r.text:
        return (s.starts, s.ends, np.zeros(len(s.ids), bool)), (t.starts, t.ends, np.zeros(len(t.ids), bool))
    shared = s.r.shared  # both renderings have the same segments: markup, then per message lead/core/trail
    paired = s.r.closes & (s.eot >= 0) & (t.eot >= 0)
    length = np.where(shared, s.r.seg[:, 1] - s.r.seg[:, 0], paired.astype(np.int64))
    base = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64)
    out = []
    for x in (s, t):
        eot_end = np.where(paired, x.ends[np.maximum(x.eot, 0)] if len(x.ids) else 0, -1)
        st, en = (_to_common(p, x.r.seg, shared, paired, base, eot_end) for p in (x.starts, x.ends))
        eot_tok = np.zeros(len(x.ids), bool)
        eot_tok[x.eot[paired]] = True
        dirty = (en > st) & ~x.inside & ~eot_tok
        out.append((st, en, dirty))
    return out[0], out[1]


@dataclass
class _TeacherDoc:
    ids: np.ndarray       # int64 [n_t]
    chunks: np.ndarray    # int64 [K, 4]
    correct: np.ndarray   # bool [K]
    keep: np.ndarray      # bool [K]: counts (completion, no markup); ANDed into Alignment.chunk_valid
    topk: tuple[torch.Tensor, torch.Tensor] | None = None  # cached (logprobs, indices) [n_t, k]


@dataclass
class _Doc:
    s_ids: np.ndarray     # int64 [n_s]
    s_comp: np.ndarray    # bool [n_s]: CE label kept
    teachers: list[_TeacherDoc]


def _span_all(flags: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """For ranges [lo, hi): are all flags true (vacuously true for an empty range)?"""
    c = np.concatenate([[0], np.cumsum(~flags)])
    return c[hi] - c[lo] == 0


def _pair(S: list[_Side], T: list[_Side], aligner: Aligner, threads: int) -> list[_TeacherDoc]:
    """Offset merge in the common coordinate, correct as in align_batch (equal canonical bytes, the specials'
    rule: the aligner's vocabularies and prefix modes)."""
    common = [_common(s, t) for s, t in zip(S, T)]
    chunks, correct, offsets = aligner._merge_offsets(
        [c[0][0] for c in common], [c[0][1] for c in common], [c[1][0] for c in common], [c[1][1] for c in common],
        [s.ids for s in S], [t.ids for t in T], threads)
    out = []
    for b, (s, t, ((_, _, ds), (_, _, dt))) in enumerate(zip(S, T, common)):
        c = chunks[offsets[b]:offsets[b + 1]]
        clean = _span_all(~ds, c[:, 0], c[:, 1]) & _span_all(~dt, c[:, 2], c[:, 3])
        keep = clean & _span_all(s.comp, c[:, 0], c[:, 1]) & _span_all(t.comp, c[:, 2], c[:, 3])
        out.append(_TeacherDoc(t.ids, np.array(c), correct[offsets[b]:offsets[b + 1]] & clean, keep))
    return out


def _end_id(tok, ends_turn: bool) -> int | None:
    """The id of tokenizer ``tok`` that W maps a student's final EOS to (by role), so the two pair 1:1: for an EOS
    that ends turns (Qwen3's <|im_end|>) its lowest end-of-turn id, for a plain EOS its eos_token_id; where ``tok``
    lacks that role, the other stands in (W's rule)."""
    roles, eos = token_table(tok).roles, tok.eos_token_id
    if not ends_turn and eos is not None and roles[eos] != EOT:
        return eos
    eot = np.flatnonzero(roles == EOT)
    return int(eot[0]) if eot.size else eos


def _post_processor(tok) -> str:
    p = tok.backend_tokenizer.post_processor
    return "" if p is None else hashlib.sha256(p.__getstate__()).hexdigest()[:16]


def _stable_json(obj):
    """JSON stand-in for a chat template argument json cannot write. A tool function (``tools=[fn]``) is what the
    template sees, its JSON schema; ``str`` would give its address, another key in every process."""
    if callable(obj):
        from transformers.utils import get_json_schema

        try:
            return get_json_schema(obj)
        except Exception:  # no parsable docstring: apply_chat_template refuses it too; name it
            return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"
    return str(obj)


def _truncate(doc: _Doc, max_length: int | None) -> _Doc:
    """Cut every side to max_length tokens: chunks inside both cuts stay, the rest up to the cuts becomes one
    incorrect chunk (the same rule whether the doc was aligned here or read from precomputed columns)."""
    if max_length is None:
        return doc
    Ls = min(len(doc.s_ids), max_length)
    teachers = []
    for t in doc.teachers:
        Lt = min(len(t.ids), max_length)
        c = t.chunks
        bad = (c[:, 1] > Ls) | (c[:, 3] > Lt)
        if bad.any():
            k = int(np.argmax(bad))
            rest = np.array([[c[k, 0], Ls, c[k, 2], Lt]], dtype=np.int64)
            r = int(Ls > c[k, 0] or Lt > c[k, 2])  # no empty remainder chunk
            t = _TeacherDoc(t.ids[:Lt], np.concatenate([c[:k], rest[:r]]),
                            np.concatenate([t.correct[:k], np.zeros(r, bool)]),
                            np.concatenate([t.keep[:k], np.zeros(r, bool)]))
        teachers.append(t)
    return _Doc(doc.s_ids[:Ls], doc.s_comp[:Ls], teachers)


# -- packing -----------------------------------------------------------------------------------------------------------
def pack_plan(lengths: Sequence[Sequence[int]], capacity: int) -> list[list[int]]:
    """First-fit decreasing: ``lengths[i]`` are document i's token counts on every side (student, teachers...); the
    documents, longest side first, go to the first row where every side still fits in ``capacity``. Returns rows of
    document indices (in placement order). Every document gives the same number (≥ 1) of ints ≥ 0: one missing
    side would leave that side's running total unchecked."""
    capacity = _check_int(capacity, "capacity", 1, None)
    if isinstance(lengths, np.ndarray):
        lengths = lengths.tolist()
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence):
        raise TypeError(f"lengths must be a list of per-document token counts, got {type(lengths).__name__}")
    lengths = [doc.tolist() if isinstance(doc, np.ndarray) else doc for doc in lengths]
    sides = None
    for i, doc in enumerate(lengths):
        if isinstance(doc, (str, bytes)) or not isinstance(doc, Sequence) or not doc:
            raise TypeError(f"lengths[{i}] must be a non-empty list of token counts (one per side), got {doc!r}")
        if sides is not None and len(doc) != sides:
            raise ValueError(f"lengths[{i}] has {len(doc)} sides, lengths[0] has {sides}: every document needs a "
                             "count for every side")
        sides = len(doc)
        for k, n in enumerate(doc):
            _check_int(n, f"lengths[{i}][{k}]", 0, None)
    order = sorted(range(len(lengths)), key=lambda i: (-max(lengths[i], default=0), i))
    rows: list[list[int]] = []
    used: list[list[int]] = []
    for i in order:
        if max(lengths[i], default=0) > capacity:
            raise ValueError(f"document {i} has {max(lengths[i])} tokens, more than the capacity {capacity}")
        for r, u in enumerate(used):
            if all(a + b <= capacity for a, b in zip(u, lengths[i])):
                rows[r].append(i)
                used[r] = [a + b for a, b in zip(u, lengths[i])]
                break
        else:
            rows.append([i])
            used.append(list(lengths[i]))
    return rows


def _split_first(c: np.ndarray, ok: np.ndarray, keep: np.ndarray, side: int):
    """In a packed row, logit row o-1 belongs to the previous document: the chunk holding a document's first token
    on ``side`` (s -> rows [s-1, e-1)) would gain that row. Split the token off as a one-sided gap so the chunk keeps
    exactly the rows it had unpacked (a 1-token side becomes a gap, as it had no predictive row)."""
    nonempty = c[:, 2 * side + 1] > c[:, 2 * side]
    if not nonempty.any():
        return c, ok, keep
    k = int(np.argmax(nonempty))
    if (c[k, 1] == c[k, 0]) or (c[k, 3] == c[k, 2]):  # a gap has no predictive rows anyway
        return c, ok, keep
    gap, rest = c[k].copy(), c[k].copy()
    gap[2 * side + 1] = gap[2 * side] + 1            # the first token, alone
    gap[2 * (1 - side) + 1] = gap[2 * (1 - side)]    # empty on the other side
    rest[2 * side] += 1
    still = rest[1] > rest[0] and rest[3] > rest[2]
    return (np.concatenate([c[:k], gap[None], rest[None], c[k + 1:]]),
            np.concatenate([ok[:k], [False], [ok[k] and still], ok[k + 1:]]),
            np.concatenate([keep[:k], [False], [keep[k]], keep[k + 1:]]))


def _pack_row(docs: list[_Doc]):
    """Concatenate documents into one row on every side -> (merged _Doc, per-side [lengths])."""
    s_ids = np.concatenate([d.s_ids for d in docs])
    s_comp = np.concatenate([d.s_comp for d in docs])
    s_off = np.concatenate([[0], np.cumsum([len(d.s_ids) for d in docs])]).astype(np.int64)
    starts = s_off[1:-1]  # HF shifts labels: a document's first label would be predicted by the previous one
    s_comp[starts[starts < len(s_comp)]] = False  # (an empty last document starts at the row's end)
    teachers, t_lens = [], []
    for j in range(len(docs[0].teachers)):
        ts = [d.teachers[j] for d in docs]
        t_off = np.concatenate([[0], np.cumsum([len(t.ids) for t in ts])]).astype(np.int64)
        cs, oks, keeps = [], [], []
        for i, t in enumerate(ts):
            c, ok, keep = t.chunks + np.array([s_off[i], s_off[i], t_off[i], t_off[i]]), t.correct, t.keep
            for side, off in ((0, s_off[i]), (1, t_off[i])):
                if off > 0:
                    c, ok, keep = _split_first(c, ok, keep, side)
            cs.append(c)
            oks.append(ok)
            keeps.append(keep)
        topk = None
        if ts[0].topk is not None:
            topk = tuple(torch.cat([t.topk[x] for t in ts]) for x in (0, 1))
        teachers.append(_TeacherDoc(np.concatenate([t.ids for t in ts]), np.concatenate(cs).reshape(-1, 4),
                                    np.concatenate(oks).astype(bool), np.concatenate(keeps).astype(bool), topk))
        t_lens.append([len(t.ids) for t in ts])
    return _Doc(s_ids, s_comp, teachers), [[len(d.s_ids) for d in docs], *t_lens]


def _positions(row_lengths: list[list[int]], width: int):
    """position_ids [B, width] restarting at 0 per document (0 on padding) and cu_seqlens int32 [B, D+1]
    (document boundaries per row; rows with fewer documents repeat their total)."""
    B, D = len(row_lengths), max(len(r) for r in row_lengths)
    pos = torch.zeros(B, width, dtype=torch.long)
    cu = torch.zeros(B, D + 1, dtype=torch.int32)
    for b, lens in enumerate(row_lengths):
        if lens:
            pos[b, :sum(lens)] = torch.cat([torch.arange(n) for n in lens])
        c = np.cumsum(lens)
        cu[b, 1:] = int(c[-1]) if len(c) else 0
        cu[b, 1:len(c) + 1] = torch.from_numpy(c.astype(np.int32))
    return pos, cu


def _pad_id(tok) -> int:
    for x in (tok.pad_token_id, tok.eos_token_id):
        if x is not None:
            return int(x)
    return 0


class Collator:
    """Batches for cross-tokenizer distillation (one student side shared by every teacher).

    ``Collator(student_tok, teachers=[teacher_tok, ...], max_length=None)``; tokenizers as objects or names.
    Examples: a ``str``, ``{"text": str}``, ``{"prompt": str, "completion": str}``, ``{"messages": [{"role",
    "content"}, ...]}`` (rendered by EACH tokenizer's own chat template; a tokenizer without one is an error) or
    ``{"prompt": [messages], "completion": [messages]}``, or rows written by :meth:`preprocess`.

    - ``completion_only``: count only the completion (CE labels and KD chunks). ``None`` (default): on for
      prompt/completion and chat examples (the assistant messages and their end-of-turn token), off for raw text.
    - ``max_length``: tokens per side (student and each teacher cut separately). Required for ``packing``.
    - ``packing``: first-fit-decreasing over the longest side packs the batch's documents into rows of
      ``max_length`` on every side with one shared plan; adds ``position_ids`` (restarting per document) and
      ``cu_seqlens`` per row; no chunk crosses documents and no logit row predicts across a boundary, so the loss
      equals the unpacked one (a document's first chunk loses its first token to a one-sided gap, whose label the
      boundary drops, and keeps its unpacked ``chunk_correct`` unless that side had only that token).
    - ``teacher_caches``: per teacher ``None`` or an ``xt.teacher_cache.TeacherCache`` (or its path); its top-k
      log-probs come back as ``topk_logprobs``/``topk_indices`` for the losses' sparse teacher path.
    - ``include_mismatched``: count incorrect non-gap chunks (the authors' release); template markup never counts.
    - ``chat_template_kwargs``: extra arguments of ``apply_chat_template`` (e.g. ``enable_thinking=False``).
    - ``threads``: C++ merge threads per call (1 suits DataLoader workers; 0 = all cores).

    An empty or whitespace-only text gives an example with zero chunks and no labels (warned once per collator).
    The collator pickles (DataLoader workers with fork or spawn, ``datasets.map(num_proc=N)``)."""

    def __init__(self, student_tok, teachers, max_length: int | None = None, *, completion_only: bool | None = None,
                 packing: bool = False, pad_to_multiple_of: int | None = None, include_mismatched: bool = False,
                 teacher_caches=None, chat_template_kwargs: dict | None = None, threads: int = 1):
        if isinstance(teachers, (str, bytes)) or not isinstance(teachers, Sequence) or not teachers:
            raise TypeError("teachers must be a non-empty list of tokenizers (objects or names)")
        for name, value in (("max_length", max_length), ("pad_to_multiple_of", pad_to_multiple_of)):
            if value is not None:
                _check_int(value, name, 1, None)
        for name, value in (("completion_only", completion_only), ("packing", packing),
                            ("include_mismatched", include_mismatched)):
            if not (isinstance(value, (bool, np.bool_)) or value is None and name == "completion_only"):
                raise TypeError(f"{name} must be a bool{' or None' * (name == 'completion_only')}, got {value!r}")
        if threads is None:
            raise TypeError("threads must be an int (0 = all cores), got None")
        threads = _check_threads(threads)
        if packing and max_length is None:
            raise ValueError("packing needs max_length (the row capacity)")
        self.student_tok = load_tokenizer(student_tok)
        self.teacher_toks = [load_tokenizer(t) for t in teachers]
        self.max_length = None if max_length is None else int(max_length)
        self.completion_only = completion_only
        self.packing = packing
        self.pad_to_multiple_of = pad_to_multiple_of
        self.include_mismatched = include_mismatched
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.threads = threads
        if isinstance(teacher_caches, (str, bytes, os.PathLike, teacher_cache.TeacherCache)):  # a str splits in chars
            raise TypeError("teacher_caches is a list with one cache (a TeacherCache, its path or None) per teacher: "
                            f"wrap a single one, teacher_caches=[{teacher_caches!r}]")
        caches = [None] * len(self.teacher_toks) if teacher_caches is None else list(teacher_caches)
        if len(caches) != len(self.teacher_toks):
            raise ValueError(f"{len(caches)} teacher_caches for {len(self.teacher_toks)} teachers")
        self.teacher_caches = []
        for j, (c, tok) in enumerate(zip(caches, self.teacher_toks)):
            if c is not None and not isinstance(c, teacher_cache.TeacherCache):
                c = teacher_cache.load(c)
            if c is not None and c.fingerprint != token_table(tok).fingerprint:
                raise ValueError(f"teacher_caches[{j}] was built with a different tokenizer (fingerprint "
                                 f"{c.fingerprint} vs {token_table(tok).fingerprint})")
            self.teacher_caches.append(c)
        self._warned_empty = self._warned_cut = False
        self._key_cache: str | None = None
        self._aligners: dict[int, Aligner] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_aligners"] = {}  # rebuilt lazily (native vocab objects)
        return state

    # -- public --------------------------------------------------------------------------------------------------------
    def __call__(self, examples) -> Batch:
        """Collate a list of examples (see the class doc) into a ``Batch``."""
        examples = _example_list(examples)
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        return self._batch(self._example_docs(examples))

    def preprocess(self, batch: Mapping[str, list]) -> dict[str, list]:
        """Batched ``datasets.map`` function (``ds.map(collator.preprocess, batched=True, num_proc=N)``): tokenizes
        and aligns every example once and returns Arrow-friendly columns (``xt_student_ids``, ``xt_student_comp``,
        per teacher j ``xt_teacher{j}_ids``, ``_chunks`` (flat [K*4]), ``_correct``, ``_keep``, ``xt_key``, a
        digest of the tokenizers, templates and options that the collator checks, and ``xt_cut``, the
        ``max_length`` a side of the example was cut to (0: none was), so that a collator with a larger
        ``max_length`` refuses the shorter rows). Pure: the output depends only on the input rows and the collator's
        configuration."""
        names = list(batch)
        n = len(batch[names[0]]) if names else 0
        rows = [{k: batch[k][i] for k in names} for i in range(n)]
        m = self.max_length
        docs = self._docs(rows, range(n))
        cut = [m if m is not None and max(len(d.s_ids), *(len(t.ids) for t in d.teachers)) > m else 0 for d in docs]
        docs = [self._cut(d, m) for d in docs]
        out = {f"{_PRE}key": [self._key()] * n, f"{_PRE}cut": cut,
               f"{_PRE}student_ids": [d.s_ids.tolist() for d in docs],
               f"{_PRE}student_comp": [d.s_comp.tolist() for d in docs]}
        for j in range(len(self.teacher_toks)):
            ts = [d.teachers[j] for d in docs]
            out[f"{_PRE}teacher{j}_ids"] = [t.ids.tolist() for t in ts]
            out[f"{_PRE}teacher{j}_chunks"] = [t.chunks.reshape(-1).tolist() for t in ts]
            out[f"{_PRE}teacher{j}_correct"] = [t.correct.tolist() for t in ts]
            out[f"{_PRE}teacher{j}_keep"] = [t.keep.tolist() for t in ts]
        return out

    def teacher_ids(self, examples, teacher: int = 0) -> list[np.ndarray]:
        """Teacher ``teacher``'s token ids of each example exactly as the collator produces them (rendering,
        specials, truncation; a row of ``preprocess`` columns gives its stored ids): what ``xt.teacher_cache.build``
        must see for the cache to serve these examples."""
        examples = _example_list(examples)
        # checked first: -1 would silently be the last teacher, and a bad index should not cost a full alignment
        teacher = _check_int(teacher, "teacher", 0, len(self.teacher_toks) - 1)
        return [d.teachers[teacher].ids for d in self._example_docs(examples)]

    def on_policy(self, student_ids, *, attention_mask=None, prompt_length: int = 0,
                  skip_special_tokens: bool = True, threads: int | None = None) -> Batch:
        """Student-generated ids [B, T] -> the same ``Batch`` as ``__call__``: each row's real tokens
        (``attention_mask``: left or right padding; the default is below) stay the student side, their decoded text
        is tokenized by every teacher (with its specials) and aligned to them with ``Aligner.align_ids_batch``
        (canonical bytes; specials and undecodable bytes become gaps), the whole batch per teacher in C++ threads
        (``threads``: None = all cores, as this runs in the training process, not in a DataLoader worker). Columns
        ``>= prompt_length`` are the completion: with ``prompt_length > 0`` only they count (CE labels and KD).
        Generated text is in no teacher cache: the batch carries no ``topk_*`` fields, so run every teacher on its
        ``input_ids`` (a collator with ``teacher_caches`` still works here).

        Without ``attention_mask`` the mask is what ``generate()`` leaves: pad tokens (other than EOS) are padding;
        when EOS doubles as the pad (``pad_token_id`` None or = EOS) a leading run of EOS is left padding; and the
        generation ends at the first EOS at a column ``>= prompt_length`` (with ``prompt_length`` 0: the first EOS
        of the row's trailing run of EOS and padding, so an end of turn inside a chat prompt does not end it). That
        EOS stays (a real token, labelled and distilled: each teacher's ids get the token W maps it to, ``_end_id``,
        after the text of a row that ends on EOS) and every column after it is padding, whatever token ``generate()``
        padded with. Pass ``attention_mask`` for other layouts (right-padded prompts padded with EOS, a model that
        stops on a token other than the tokenizer's ``eos_token_id``). ``skip_special_tokens=False`` keeps the student's specials in
        the decoded text (a teacher with another tokenizer reads them as text); a teacher's BOS is then not doubled
        where the text already starts with it."""
        ids = torch.as_tensor(student_ids).detach().cpu()  # generate() leaves them on the model's device
        if ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"student_ids must be integer [B, T], got {tuple(ids.shape)} {ids.dtype}")
        ids = ids.long()  # a narrow dtype would wrap the vocabulary size in the range check below
        if ids.shape[0] == 0:
            raise ValueError("student_ids has no rows: on_policy needs at least one generated sequence")
        _check_int(prompt_length, "prompt_length", 0, None)
        if attention_mask is None:
            mask = _generated_mask(ids, self.student_tok.pad_token_id, self.student_tok.eos_token_id, prompt_length)
        else:
            mask = torch.as_tensor(attention_mask).detach().cpu().bool()
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask {tuple(mask.shape)} must match student_ids {tuple(ids.shape)}")
        V = token_table(self.student_tok).size
        bad = mask & ((ids < 0) | (ids >= V))  # padding may hold anything (e.g. -100); real tokens must be ids
        if bad.any():
            b, c = (int(x) for x in bad.nonzero()[0])
            raise IndexError(f"student_ids[{b}]: id {int(ids[b, c])} at column {c} is out of range for the student's "
                             f"vocabulary of {V}")
        cols = torch.arange(ids.shape[1]).expand_as(ids)
        rows = [ids[b][mask[b]].numpy().astype(np.int64) for b in range(ids.shape[0])]
        comps = [(cols[b][mask[b]] >= prompt_length).numpy() for b in range(ids.shape[0])]
        texts = self.student_tok.batch_decode([r.tolist() for r in rows], skip_special_tokens=skip_special_tokens)
        eos = self.student_tok.eos_token_id
        ended = [eos is not None and len(r) > 0 and r[-1] == eos for r in rows]
        ends_turn = eos is not None and token_table(self.student_tok).roles[eos] == EOT
        teachers = []
        for j, tok in enumerate(self.teacher_toks):
            aligner = self._aligner(j)
            t_ids = tok(texts, add_special_tokens=True)["input_ids"]
            if not skip_special_tokens and tok.bos_token_id is not None:  # a BOS kept in the text, then the added one
                t_ids = [t[1:] if len(t) > 1 and t[0] == t[1] == tok.bos_token_id else t for t in t_ids]
            # a generation that ended gives each teacher the token W maps the student's EOS to (the decoded text has
            # none): the two pair 1:1 and the teacher's "stop here" is distilled
            end_id = _end_id(tok, ends_turn)
            if end_id is not None:
                t_ids = [t + [end_id] if end and (not t or t[-1] != end_id) else t for t, end in zip(t_ids, ended)]
            ali = aligner.align_ids_batch(rows, t_ids, threads=threads)
            docs_j = []
            for b, (comp, t) in enumerate(zip(comps, t_ids)):
                k = int(ali.num_chunks[b])
                chunks = ali.chunks[b, :k].numpy()
                keep = _span_all(comp, chunks[:, 0], chunks[:, 1])
                docs_j.append(_TeacherDoc(np.asarray(t, dtype=np.int64), chunks, ali.chunk_correct[b, :k].numpy(),
                                          keep))
            teachers.append(docs_j)
        docs = [self._cut(_Doc(s, comp, [t[b] for t in teachers]), self.max_length)
                for b, (s, comp) in enumerate(zip(rows, comps))]
        return self._batch(docs, use_caches=False)

    # -- internals -----------------------------------------------------------------------------------------------------
    def _aligner(self, j: int) -> Aligner:
        """The student / teacher j Aligner (native vocabularies, prefix modes), built once."""
        if j not in self._aligners:
            self._aligners[j] = Aligner(self.student_tok, self.teacher_toks[j])
        return self._aligners[j]

    def _cut(self, doc: _Doc, max_length: int | None) -> _Doc:
        """``_truncate``, warning (once per collator) where the cut leaves an example's completion no token."""
        out = _truncate(doc, max_length)
        if not self._warned_cut and doc.s_comp.any() and not out.s_comp.any():
            warnings.warn(f"an example's completion starts past max_length ({max_length}): it gets no labels and "
                          "no KD (warned once per collator)", stacklevel=4)
            self._warned_cut = True
        return out

    def _key(self) -> str:
        if self._key_cache is None:
            self._key_cache = self._digest()
        return self._key_cache

    def _digest(self) -> str:
        toks = [self.student_tok, *self.teacher_toks]
        desc = {"fingerprints": [token_table(t).fingerprint for t in toks],
                "behaviours": [token_table(t).behaviour for t in toks],  # the same vocabulary, other merges
                # raw texts take the tokenizer's own specials (BOS / EOS), which W's behaviour hash leaves out
                "post_processors": [_post_processor(t) for t in toks],
                "templates": [hashlib.sha256(str(getattr(t, "chat_template", None)).encode()).hexdigest()[:16]
                              for t in toks],
                "completion_only": self.completion_only, "chat_template_kwargs": self.chat_template_kwargs}
        return hashlib.sha256(json.dumps(desc, sort_keys=True, default=_stable_json).encode()).hexdigest()[:24]

    def _example_docs(self, examples: list) -> list[_Doc]:
        """The cut doc of every example: aligned here, or read from its ``preprocess`` columns."""
        docs: list[_Doc | None] = [None] * len(examples)
        fresh = [i for i, ex in enumerate(examples) if not (isinstance(ex, Mapping) and f"{_PRE}student_ids" in ex)]
        for i, d in zip(fresh, self._docs([examples[i] for i in fresh], fresh)):
            docs[i] = self._cut(d, self.max_length)
        for i in set(range(len(examples))) - set(fresh):
            docs[i] = self._from_columns(examples[i], i)
        return docs

    def _docs(self, examples: list, where) -> list[_Doc]:
        """Parse, render, tokenize and align ``examples`` (``where``: their indices, for error messages); uncut."""
        where = list(where)
        parsed, co = [], []
        for ex, i in zip(examples, where):
            p = _parse(ex, i)
            only = (p[0] == "chat" or p[1] != "") if self.completion_only is None else self.completion_only
            if p[0] == "text" and not (p[1] + p[2]).strip():
                if not self._warned_empty:
                    warnings.warn("empty or whitespace-only text: the example gets zero chunks and no labels "
                                  "(warned once per collator)", stacklevel=3)
                    self._warned_empty = True
                p, only = ("text", "", ""), True  # an empty completion: no chunk and no label counts
            parsed.append(p)
            co.append(bool(only))
        # raw text: one rendering for every side; only a prompt is outside the completion
        plain = {i: _segments([(p[1], True, False, False), (p[2], True, True, False)], add_special=True)
                 for i, p in enumerate(parsed) if p[0] == "text"}

        def rendered(tok):
            return [plain[i] if p[0] == "text" else _render_chat(tok, p[1], p[2], self.chat_template_kwargs, where[i])
                    for i, p in enumerate(parsed)]

        student = _encode(self.student_tok, rendered(self.student_tok), co)
        pairs = [_pair(student, _encode(tok, rendered(tok), co), self._aligner(j), self.threads)
                 for j, tok in enumerate(self.teacher_toks)]
        return [_Doc(s.ids, s.comp, [p[b] for p in pairs]) for b, s in enumerate(student)]

    def _from_columns(self, ex: Mapping, i: int) -> _Doc:
        if ex.get(f"{_PRE}key") != self._key():
            raise ValueError(f"example {i}: its precomputed {_PRE}* columns were made by a collator with other "
                             "tokenizers, chat templates or options; rerun preprocess with this collator")
        cut = int(ex.get(f"{_PRE}cut") or 0)  # rows preprocessed before the column existed: unknown, taken whole
        if cut and (self.max_length is None or self.max_length > cut):
            raise ValueError(f"example {i}: preprocess cut it to {cut} tokens, fewer than this collator's max_length "
                             f"({self.max_length}); rerun preprocess with this collator")
        teachers = []
        for j in range(len(self.teacher_toks)):
            if f"{_PRE}teacher{j}_ids" not in ex:
                raise ValueError(f"example {i}: no precomputed columns for teacher {j}")
            teachers.append(_TeacherDoc(
                np.asarray(ex[f"{_PRE}teacher{j}_ids"], dtype=np.int64),
                np.asarray(ex[f"{_PRE}teacher{j}_chunks"], dtype=np.int64).reshape(-1, 4),
                np.asarray(ex[f"{_PRE}teacher{j}_correct"], dtype=bool).reshape(-1),
                np.asarray(ex[f"{_PRE}teacher{j}_keep"], dtype=bool).reshape(-1)))
        doc = _Doc(np.asarray(ex[f"{_PRE}student_ids"], dtype=np.int64),
                   np.asarray(ex[f"{_PRE}student_comp"], dtype=bool).reshape(-1), teachers)
        return self._cut(doc, self.max_length)

    def _width(self, n: int) -> int:
        n = max(n, 1)
        m = self.pad_to_multiple_of
        return n if m is None else -(-n // m) * m

    def _batch(self, docs: list[_Doc], use_caches: bool = True) -> Batch:
        """``use_caches=False``: serve no cached top-k (generated text is in no cache; its teachers run live)."""
        caches = self.teacher_caches if use_caches else [None] * len(self.teacher_toks)
        for j, cache in enumerate(caches):
            if cache is not None:
                for d in docs:
                    d.teachers[j].topk = cache.get(d.teachers[j].ids)
        row_lengths = None
        if self.packing:
            plan = pack_plan([[len(d.s_ids), *(len(t.ids) for t in d.teachers)] for d in docs], self.max_length)
            packed = [_pack_row([docs[i] for i in row]) for row in plan]
            docs = [p[0] for p in packed]
            row_lengths = [p[1] for p in packed]  # [row][side][doc]
        s_lens = [len(d.s_ids) for d in docs]
        W = self._width(max(s_lens))
        B = len(docs)
        input_ids = torch.full((B, W), _pad_id(self.student_tok), dtype=torch.long)
        labels = torch.full((B, W), IGNORE_INDEX, dtype=torch.long)
        for b, d in enumerate(docs):
            ids = torch.from_numpy(d.s_ids)
            input_ids[b, :len(ids)] = ids
            labels[b, :len(ids)] = torch.where(torch.from_numpy(d.s_comp), ids, IGNORE_INDEX)
        out = Batch(input_ids=input_ids, attention_mask=(torch.arange(W) < torch.tensor(s_lens)[:, None]).long(),
                    labels=labels)
        if row_lengths is not None:
            out["position_ids"], out["cu_seqlens"] = _positions([r[0] for r in row_lengths], W)
        out["teachers"] = []
        for j, tok in enumerate(self.teacher_toks):
            ts = [d.teachers[j] for d in docs]
            t_lens = [len(t.ids) for t in ts]
            Wt = self._width(max(t_lens))
            t_ids = torch.full((B, Wt), _pad_id(tok), dtype=torch.long)
            for b, t in enumerate(ts):
                t_ids[b, :len(t.ids)] = torch.from_numpy(t.ids)
            ali = Alignment.from_chunks([t.chunks for t in ts], [t.correct for t in ts], s_lens, t_lens, T_S=W,
                                        T_T=Wt, include_mismatched=self.include_mismatched,
                                        student_ids=[d.s_ids for d in docs], teacher_ids=[t.ids for t in ts])
            keep = torch.zeros_like(ali.chunk_valid)
            for b, t in enumerate(ts):
                keep[b, :len(t.keep)] = torch.from_numpy(t.keep)
            ali.chunk_valid &= keep
            td = {"input_ids": t_ids, "attention_mask": (torch.arange(Wt) < torch.tensor(t_lens)[:, None]).long(),
                  "alignment": ali}
            if row_lengths is not None:
                td["position_ids"], td["cu_seqlens"] = _positions([r[1 + j] for r in row_lengths], Wt)
            if caches[j] is not None:
                k = caches[j].k
                # padding rows: a uniform distribution over k distinct columns (finite, so no kernel sees -inf rows)
                vals = torch.full((B, Wt, k), -float(np.log(k)), dtype=caches[j].dtype)
                idx = torch.arange(k).expand(B, Wt, k).clone()
                for b, t in enumerate(ts):
                    vals[b, :len(t.ids)], idx[b, :len(t.ids)] = t.topk[0], t.topk[1]
                td["topk_logprobs"], td["topk_indices"] = vals, idx
            out["teachers"].append(td)
        return out


def _generated_mask(ids: torch.Tensor, pad: int | None, eos: int | None, prompt_length: int) -> torch.Tensor:
    """The real tokens of generate()'s output [B, T] (see Collator.on_policy)."""
    distinct = pad is not None and pad != eos
    mask = ids != pad if distinct else torch.ones_like(ids, dtype=torch.bool)
    if eos is None:
        return mask
    is_eos = ids == eos
    if not distinct:  # generate() pads with EOS: a leading run of it is left padding
        lead = torch.cumprod(is_eos.long(), 1).bool()
        mask &= ~lead
        is_eos &= ~lead
    if prompt_length > 0:  # the generation ends at its first EOS
        ends = is_eos & (torch.arange(ids.shape[1]) >= prompt_length)
    else:  # no prompt boundary: the first EOS of the row's trailing run of EOS / padding (text follows a prompt's)
        filler = (is_eos | ~mask).long()
        ends = is_eos & torch.cumprod(filler.flip(1), 1).flip(1).bool()
    return mask & (ends.long().cumsum(1) - ends.long() == 0)  # nothing after the end of generation


def _example_list(examples) -> list:
    """The examples as a list; one str (or mapping) is refused: list("hi") would be two one-character texts."""
    if isinstance(examples, (str, bytes, Mapping)):
        raise TypeError(f"examples must be a list of examples, got one {type(examples).__name__}: pass [example]")
    return list(examples)
