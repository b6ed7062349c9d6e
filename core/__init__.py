"""What every side shares: the data contract (tables, errors, ingest/), the features and the
history aggregates they look up, the model with its calibration and costs, the explanations
(+ playbook.yaml) and the MLflow pyfunc that carries them.

``core`` imports none of the project's other packages; training, the batch and the REST service
all build on it. A logged model carries this package as its code.
"""

import os

# LightGBM's OpenMP threads spin while they wait for work. On a machine whose cores are shared
# (another job, a scoring service beside the nightly batch) spinning threads steal the cores
# the working ones need: a fit measured 159 s spinning against 35 s sleeping, on 2 cores with
# one other busy process. Read once when the OpenMP runtime loads, so it is set before anything
# imports lightgbm; a value the user set wins. The packages that import lightgbm themselves
# import core first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
