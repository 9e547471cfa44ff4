"""Run the MoRE benchmarks: ``python bench/run_bench.py [--suite quick|default|full] [--json rows.json]``.

A thin wrapper around `morelora.bench.main`, the same as ``morelora bench``; see docs/BENCHMARKS.md for the recorded
figures.
"""

from __future__ import annotations

import sys

from morelora.bench import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
