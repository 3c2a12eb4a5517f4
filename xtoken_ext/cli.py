"""The `xtoken` command."""
from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time


def _bench(args) -> int:
    from xtoken_ext.bench import SUITES

    suites = args.suite or list(SUITES)
    unknown = sorted(set(suites) - set(SUITES))
    if unknown:
        print(f"unknown suite(s) {unknown}; choose from {list(SUITES)}", file=sys.stderr)
        return 2
    import torch

    print(f"xtoken bench — python {platform.python_version()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, cuda={'yes' if torch.cuda.is_available() else 'no'}"
          f"{' (quick)' if args.quick else ''}")
    for name in suites:
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        importlib.import_module(f"xtoken_ext.bench.{name}").run(quick=args.quick)
        print(f"[{name}: {time.perf_counter() - t0:.1f} s]", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xtoken", description="Cross-tokenizer distillation toolkit (X-Token).")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run the microbenchmarks (offline, built-in defaults)")
    bench.add_argument("--suite", action="append", help="run only this suite (repeatable)")
    bench.add_argument("--quick", action="store_true", help="smoke-sized inputs")
    bench.set_defaults(func=_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
