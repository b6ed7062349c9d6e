"""Training and analysis only: the training set (labels, snapshots, splits), its configuration,
fitting, evaluation against baselines and the simulator's truth, plots, the MLflow registry and
promotion, the cause report, and the readers behind ``inspect`` and ``show``."""

import core  # noqa: F401  (first: sets OMP_WAIT_POLICY before training imports lightgbm)
