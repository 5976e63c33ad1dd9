"""``python -m fxprune.cli``: the same as the ``fxprune`` console script."""

from __future__ import annotations

import sys

from fxprune.cli import main

sys.exit(main())
