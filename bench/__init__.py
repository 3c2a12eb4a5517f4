"""Microbenchmarks behind `xtoken bench`: each suite prints tables measured side by side in one run
(our fast path vs the pure reference and vs the way the peers do it). Installed as `xtoken_ext.bench`."""
SUITES = ("align", "projection", "losses")
