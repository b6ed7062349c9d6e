"""The ``cancel-risk`` command line: the composition root, which may import every package."""

import core  # noqa: F401  (first: sets OMP_WAIT_POLICY before any command imports lightgbm)
