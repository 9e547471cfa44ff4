"""``python -m morelora.bench``: the same as ``morelora bench``."""

from morelora.bench.suite import main

raise SystemExit(main())
