"""Silence one import-time warning of a dependency, before anything imports it.

bitsandbytes (>= 0.50, which PEFT imports when it is installed) logs on every import, on CPUs with AVX512-BF16,
that the optional ``kernels`` package (a model-hub download) is missing, then uses its own CPU kernel: there is
nothing for a user to do, and it would open the output of every ``morelora`` command.
"""

import logging

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
