"""ozon-cancel-risk: ingestion, features, labels and training of the cancellation-risk model."""

import os

# LightGBM's OpenMP threads spin while they wait for work. On a machine whose cores are shared
# (another job, a scoring service beside the nightly batch) spinning threads steal the cores
# the working ones need: a fit measured 159 s spinning against 35 s sleeping, on 2 cores with
# one other busy process. Read once when the OpenMP runtime loads, so it is set before anything
# imports lightgbm; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
