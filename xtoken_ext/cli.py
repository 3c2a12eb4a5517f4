"""The `xtoken` command."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

_TOKENIZER_FORMS = "HF hub name, local folder, *.gguf file, or offline:NAME"
# model types with learned absolute positions (a longer text indexes past them, mid-run) -> their config field
_LEARNED_POSITIONS = {"gpt2": "n_positions", "gpt_bigcode": "n_positions", "openai-gpt": "n_positions",
                      "ctrl": "n_positions", "opt": "max_position_embeddings", "gpt_neo": "max_position_embeddings",
                      "biogpt": "max_position_embeddings"}


def _bench(args) -> int:
    from xtoken_ext.bench import CHECKS, SUITES

    suites = args.suite or list(CHECKS if args.dry else SUITES)
    out = os.environ.get("XTOKEN_BENCH_DIR")
    error = (f"--dry applies to {list(CHECKS)} only" if args.dry and not set(suites) <= set(CHECKS) else
             f"XTOKEN_BENCH_DIR={out} is not a folder (the plots go there)" if out and Path(out).exists()
             and not Path(out).is_dir() else None)
    if error is None and "gpu" in suites:
        from xtoken_ext.bench.gpu import cannot_run  # imports torch, not triton: --dry sets TRITON_INTERPRET later

        error = cannot_run(args.dry)
    if error:
        print(f"xtoken bench: error: {error}", file=sys.stderr)
        return 2
    import torch

    print(f"xtoken bench — python {platform.python_version()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, cuda={'yes' if torch.cuda.is_available() else 'no'}"
          f"{' (quick)' if args.quick else ''}{' (dry)' if args.dry else ''}")
    failed = []
    for name in suites:
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        suite = importlib.import_module(f"xtoken_ext.bench.{name}")
        if name not in CHECKS:
            suite.run(quick=args.quick)
        elif not suite.run(quick=args.quick, dry=args.dry):
            failed.append(name)
        print(f"[{name}: {time.perf_counter() - t0:.1f} s]", flush=True)
    if failed:
        print(f"FAILED: {failed}", file=sys.stderr)
    return 1 if failed else 0


def _projection(args):
    from xtoken_ext.projection import Projection
    from xtoken_ext.tokenizers import load_tokenizer

    student, teacher = load_tokenizer(args.student), load_tokenizer(args.teacher)
    t0 = time.perf_counter()
    proj = Projection.from_tokenizers(
        student, teacher, args.student_vocab_size, args.teacher_vocab_size, max_pieces=args.max_pieces,
        gamma=args.gamma, reverse_pass=args.reverse_pass, overflow=args.overflow, cache=not args.no_cache)
    return proj, time.perf_counter() - t0


def _build(args) -> int:
    from xtoken_ext.projection import check_save_path

    check_save_path(args.output)  # before the minutes a large W may take
    proj, seconds = _projection(args)
    proj.save(args.output)
    print(f"{proj!r} -> {args.output} (W in {seconds:.2f} s, tokenizers loaded before)")
    print(proj.stats())
    return 0


def _audit(args) -> int:
    report = _projection(args)[0].audit()
    print(json.dumps(report.to_dict(), indent=2, allow_nan=False) if args.json else report)
    return 0


def _inspect(args) -> int:
    from xtoken_ext.projection import Projection, _show
    from xtoken_ext.tokenizers import NORMAL, load_tokenizer, token_table

    if args.token and not args.student:
        raise ValueError("--token needs --student (to find the token ids)")
    if args.token and not all(args.token):
        raise ValueError("--token got an empty text (it has no token)")
    student = load_tokenizer(args.student) if args.student else None
    teacher = load_tokenizer(args.teacher) if args.teacher else None
    proj = Projection.load(args.path, expect_student=student, expect_teacher=teacher)
    bad = [i for i in args.id or [] if not 0 <= i < proj.student_vocab_size]
    if bad:
        raise ValueError(f"--id {bad[0]} is outside W's student ids [0, {proj.student_vocab_size})")
    meta = {k: proj.meta.get(k) for k in ("student_fingerprint", "teacher_fingerprint", "options",
                                          "library_version")}
    print(f"{proj!r}\n{json.dumps(meta, sort_keys=True)}\n{proj.stats()}")
    s_table = token_table(student) if student is not None else None
    t_table = token_table(teacher) if teacher is not None else None

    def name(table, i):  # ids past the tokenizer (padding rows of a wider logit layer) have no text; an added
        if not table or i >= table.size:  # special shows its token string, not the table's role marker
            return ""
        special = table.roles[i] != NORMAL and i in table.tokenizer.added_tokens_decoder
        return _show((table.tokenizer.convert_ids_to_tokens(i) or "").encode() if special else table.token_bytes[i])

    ids = list(args.id or [])
    for text in args.token or []:
        b = text.encode("utf-8")
        same = [i for i, x in enumerate(s_table.token_bytes) if x == b]
        if same:  # the token itself (the id the tokenizer emits, not a byte-fallback alias), else its pieces
            emitted = [i for i in same if proj.alias_rows is None or not proj.alias_rows[i]]
            ids.append((emitted or same)[0])
        else:
            ids += student(text, add_special_tokens=False)["input_ids"]
    for s in ids:
        row = " + ".join(f"{w:.6f}·{name(t_table, t)}({t})" for t, w in proj.row(s).items()) or "(empty)"
        print(f"{name(s_table, s)}({s}) -> {row}")
    return 0


def _read_texts(path: str, field: str) -> list[str]:
    """Texts of a .jsonl file (the ``field`` of every line; blank lines are skipped), a .json file (a list of such
    rows, or JSON Lines) or a plain text file (every line a text, blank ones too, as ``datasets.load_dataset("text")``
    reads it: the collator makes them empty examples, which the cache must serve); a UTF-8 byte-order mark is
    dropped from JSON and kept in a text file's first text, as ``datasets`` reads each; a file without a text is an
    error (not an empty cache)."""
    kind = os.path.splitext(path)[1].lower()
    try:
        with open(path, encoding="utf-8-sig" if kind in (".json", ".jsonl") else "utf-8") as f:
            content = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    lines = content.split("\n")  # only "\n" ends a line: JSON may hold U+2028, and load_dataset splits so
    rows = list(enumerate(lines[:-1] if content.endswith("\n") else lines, 1)) if content else []
    if kind in (".json", ".jsonl"):
        rows = [(n, line) for n, line in rows if line.strip()]
        try:
            whole = json.loads(content) if kind == ".json" else None
        except json.JSONDecodeError:
            whole = None  # JSON Lines in a .json file
        if isinstance(whole, dict):
            raise ValueError(f"{path}: one JSON object; a .json file holds a list of rows, or one row per line")
        rows = list(enumerate(whole, 1)) if isinstance(whole, list) else [(n, _json_line(path, n, line))
                                                                          for n, line in rows]
        where = f"{path}: item " if isinstance(whole, list) else f"{path}:"
        for n, row in rows:
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise ValueError(f"{where}{n}: no text field {field!r} (see --field)")
        rows = [(n, row[field]) for n, row in rows]
    for n, text in rows:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a JSON "\ud800" escape: no tokenizer takes it
            raise ValueError(f"{path}:{n}: the text holds a lone surrogate ({e.reason}); it is not Unicode text") \
                from None
    if not any(text.strip() for _, text in rows):
        raise ValueError(f"{path}: no text in it")
    return [text for _, text in rows]


def _json_line(path: str, n: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None


def _teacher_cache(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from xtoken_ext import teacher_cache

    from xtoken_ext.tokenizers import load_tokenizer, token_table

    texts = _read_texts(args.data, args.field)  # a bad file fails before the model loads
    device = None
    if args.device:
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            raise ValueError(f"--device {args.device!r}: {e}") from None
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.type == "cuda" and (device.index or 0) >= visible:
            raise ValueError(f"--device {args.device!r}: no such CUDA device here ({visible} visible)")
        try:  # any other backend (mps, xpu, ...) that this torch lacks or this machine does not have
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as e:
            raise ValueError(f"--device {args.device!r}: not available here ({str(e).splitlines()[0]})") from None
    tok = load_tokenizer(args.tokenizer or args.model)
    local = os.path.expanduser(args.model)  # "~/m" too (the shell leaves --model=~/m and quoted paths alone)
    gguf = Path(local) if local.lower().endswith(".gguf") else None
    kw = {"gguf_file": gguf.name} if gguf else {}  # from_pretrained(folder, gguf_file=name)
    where = str(gguf.parent) if gguf else local
    model = AutoModelForCausalLM.from_pretrained(where, dtype=getattr(torch, args.model_dtype), **kw).eval()
    rows = getattr(model.get_input_embeddings(), "num_embeddings", None)
    n_ids = token_table(tok).size
    if rows is not None and n_ids > rows:  # an id past the embedding fails inside the model, mid-run
        raise ValueError(f"the tokenizer has {n_ids} ids but the model embeds {rows}: not this model's "
                         "tokenizer (see --tokenizer)")
    positions = getattr(model.config, _LEARNED_POSITIONS.get(model.config.model_type, ""), None)
    if positions and (args.max_length is None or args.max_length > positions):
        longest = max(len(ids) for ids in tok(texts)["input_ids"])
        if longest > positions:
            raise ValueError(f"a text has {longest} tokens but the model has {positions} positions: pass "
                             f"--max-length {positions} (or less)")
    if device is not None:
        model.to(device)
    # the name a resumed run must repeat: a local model by its real path ("m", "./m", "/abs/m" are one model)
    name = os.path.realpath(local) if os.path.exists(local) else args.model
    cache = teacher_cache.build(model, tok, texts, args.output, k=args.k, dtype=getattr(torch, args.dtype),
                                name=name, max_length=args.max_length, batch_size=args.batch_size, device=device,
                                overwrite=args.overwrite)
    print(f"{len(texts)} texts ({len(cache)} distinct sequences), top-{cache.k} {args.dtype} log-probs -> "
          f"{args.output}")
    return 0


def _add_pair_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("student", help=f"student tokenizer: {_TOKENIZER_FORMS}")
    p.add_argument("teacher", help=f"teacher tokenizer: {_TOKENIZER_FORMS}")
    p.add_argument("--student-vocab-size", type=int, help="student logit width (default: len(tokenizer))")
    p.add_argument("--teacher-vocab-size", type=int, help="teacher logit width (default: len(tokenizer))")
    p.add_argument("--max-pieces", type=int, default=4, help="teacher pieces kept per row, 1..4 (default 4)")
    p.add_argument("--gamma", type=float, default=0.1, help="weight decay γ^i of piece i, in (0, 1] (default 0.1)")
    p.add_argument("--reverse-pass", action="store_true", help="also re-tokenize teacher tokens with the student")
    p.add_argument("--overflow", choices=("truncate", "drop"), default="truncate",
                   help="rows needing more than --max-pieces teacher pieces: keep the first ones, or leave empty")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the on-disk W cache")


def build_parser() -> argparse.ArgumentParser:
    from xtoken_ext.bench import CHECKS, SUITES  # names only: the suites import when they run

    parser = argparse.ArgumentParser(prog="xtoken", description="Cross-tokenizer distillation toolkit (X-Token).")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run the microbenchmarks (offline, built-in defaults), or the GPU check "
                                         "(--suite gpu: exits 1 when a check fails)")
    bench.add_argument("--suite", action="append", choices=SUITES + CHECKS,
                       help="run only this suite (repeatable; gpu only when named)")
    bench.add_argument("--quick", action="store_true", help="smoke-sized inputs")
    bench.add_argument("--dry", action="store_true", help="the GPU check (--suite gpu, the default with --dry) on "
                                                          "the CPU under the Triton interpreter at tiny sizes")
    bench.set_defaults(func=_bench)
    build = sub.add_parser("build", help="build the projection W for a student/teacher pair and save it")
    _add_pair_options(build)
    build.add_argument("-o", "--output", required=True, type=os.path.expanduser, help="output .safetensors file")
    build.set_defaults(func=_build)
    audit = sub.add_parser("audit", help="coverage audit of a pair: token classes in the exact common set, "
                                         "P-KL vs H-KL recommendation")
    _add_pair_options(audit)
    audit.add_argument("--json", action="store_true", help="print the report as JSON")
    audit.set_defaults(func=_audit)
    inspect = sub.add_parser("inspect", help="statistics of a saved W and the rows of given tokens")
    inspect.add_argument("path", type=os.path.expanduser, help="a .safetensors file written by `xtoken build`")
    inspect.add_argument("--token", action="extend", nargs="+", help="student token text(s) (needs --student)")
    inspect.add_argument("--id", action="extend", nargs="+", type=int, help="student token id(s)")
    inspect.add_argument("--student", help=f"student tokenizer ({_TOKENIZER_FORMS}), checked against the file's "
                                           "fingerprint")
    inspect.add_argument("--teacher", help=f"teacher tokenizer ({_TOKENIZER_FORMS}), to print teacher token strings")
    inspect.set_defaults(func=_inspect)
    tc = sub.add_parser("teacher-cache", help="run a teacher over texts once and store its top-k log-probs "
                                              "(safetensors shards + manifest; resumable)")
    tc.add_argument("model", help="teacher model: HF hub name, local folder or *.gguf file (transformers)")
    tc.add_argument("data", type=os.path.expanduser,
                    help="texts: a .jsonl file (see --field), a .json file (a list of rows, or JSON Lines) or a text "
                         "file with one text per line (blank lines too); raw texts, tokenized with the teacher's "
                         "specials (for chat data use teacher_cache.build)")
    tc.add_argument("-o", "--output", required=True, type=os.path.expanduser, help="cache directory")
    tc.add_argument("--tokenizer", help=f"teacher tokenizer ({_TOKENIZER_FORMS}); default: the model's")
    tc.add_argument("--field", default="text", help="the text field of a .jsonl / .json file")
    tc.add_argument("-k", type=int, default=64, help="top-k log-probs kept per position")
    tc.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16", help="stored values")
    tc.add_argument("--model-dtype", choices=("bfloat16", "float16", "float32"), default="float32",
                    help="the teacher's weights (default float32)")
    tc.add_argument("--max-length", type=int,
                    help="cut each tokenized text to this many tokens (give the collator's max_length)")
    tc.add_argument("--batch-size", type=int, default=8, help="texts per teacher forward (default 8)")
    tc.add_argument("--device", help="e.g. cuda (default: where the model is)")
    tc.add_argument("--overwrite", action="store_true", help="replace a cache built at --output with other settings")
    tc.set_defaults(func=_teacher_cache)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "bench" or os.environ.get("XTOKEN_TRACEBACK", "0") not in ("", "0"):
            return args.func(args)
        try:
            return args.func(args)
        except BrokenPipeError:
            raise
        except (ValueError, OSError, MemoryError) as e:  # bad input (files, tokenizers, options, sizes): one line
            print(f"xtoken {args.command}: error: {e} (XTOKEN_TRACEBACK=1 shows where)", file=sys.stderr)
            return 2
    except BrokenPipeError:  # the reader left (`xtoken inspect ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
