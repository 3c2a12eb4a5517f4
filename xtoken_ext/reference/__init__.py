"""Pure-PyTorch / pure-Python oracles for every fast path (aligner and losses). Slow, obviously correct.

Never imported by the fast path; tests and benchmarks compare against it."""
from .align import *  # noqa: F401,F403
from .losses import *  # noqa: F401,F403
