"""Microbenchmarks behind `xtoken bench`: each suite prints tables measured side by side in one run
(our fast path vs the pure reference and vs the way the peers do it). Installed as `xtoken_ext.bench`.

SUITES run by default; CHECKS only when named (`xtoken bench --suite gpu`): pass/fail checks whose
``run(quick, dry)`` returns True when everything passed (the command then exits 0, else 1)."""
SUITES = ("align", "projection", "losses", "costmodel", "linear_head")
CHECKS = ("gpu",)
