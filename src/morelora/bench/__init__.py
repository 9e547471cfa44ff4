"""Benchmarks of the library's cost: the harness (:mod:`.harness`: variants sharing one frozen base, interleaved
timing, paired ratios and their confidence intervals) and the suite behind ``morelora bench`` (:mod:`.suite`).

The scripts in the repository's ``bench/`` folder (inference paths, profiles, quantisation, serving, the
comparison protocol) build on the harness's public names. Importing this package imports torch.
"""

from morelora.bench.harness import *  # noqa: F403
from morelora.bench.harness import __all__ as _harness_all
from morelora.bench.suite import *  # noqa: F403
from morelora.bench.suite import __all__ as _suite_all

__all__ = [*_harness_all, *_suite_all]
