"""Measurements and tooling outside the product: the batch, training and reasons benchmarks, the
REST load generator (rest), the soak, the OpenAPI fuzz and the dependency audit."""

import core  # noqa: F401  (first: sets OMP_WAIT_POLICY before a benchmark imports lightgbm)
