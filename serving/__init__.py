"""The REST scoring service: only what a deployment runs. It imports ``core`` and nothing else
of the project."""

import core  # noqa: F401  (first: sets OMP_WAIT_POLICY before the service imports lightgbm)
