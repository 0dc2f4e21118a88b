"""``python -m scripts.bench``: the benchmark suite, or ``--compare REF`` (``_main``)."""

import sys

from ._main import main

sys.exit(main())
