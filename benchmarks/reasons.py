"""Counterfactual reasons against TreeSHAP: what each costs, and whether they name the same cause.

Run ``python -m benchmarks.reasons --history DIR --model URI`` (a trained model and a
history, e.g. ``make demo``'s). For the postings open at the export moment it measures

- the cost per posting of the counterfactual drops (:func:`core.counterfactuals.build_risk_drops`)
  and of LightGBM's TreeSHAP contributions (``pred_contrib=True``), for one posting at a time
  and for all of them in one call (medians of ``--repeats``);
- how often the two agree on the top cause, where TreeSHAP's contribution of a cause is the sum
  over the features that cause's counterfactual changes
  (:data:`training.reason_quality.SHAP_CAUSE_FEATURES`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pandas as pd

from core.counterfactuals import CAUSES, build_risk_drops
from training.reason_quality import SHAP_CAUSE_FEATURES


def _median_seconds(work, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(history: str, model_uri: str, repeats: int, single_rows: int) -> dict:
    from batch.models import load_scoring_model
    from core.features import build_features
    from core.ingest import load_history

    tables = load_history(history)
    model = load_scoring_model(model_uri).risk_model
    features = build_features(tables, tables.latest_event_at(), aggregates=model.aggregates)
    matrix = model.build_matrix(features)
    n = len(features)

    def counterfactual_all():
        return build_risk_drops(model, features)

    def shap_all():
        return model.booster.predict(matrix, pred_contrib=True)

    one = features.iloc[:1]
    one_matrix = matrix[:1]
    cost = {
        "counterfactual_batch_us_per_row": 1e6 * _median_seconds(counterfactual_all, repeats) / n,
        "treeshap_batch_us_per_row": 1e6 * _median_seconds(shap_all, repeats) / n,
        "counterfactual_one_row_us": 1e6
        * _median_seconds(lambda: build_risk_drops(model, one), single_rows),
        "treeshap_one_row_us": 1e6
        * _median_seconds(
            lambda: model.booster.predict(one_matrix, pred_contrib=True, num_threads=1),
            single_rows,
        ),
    }
    drops = counterfactual_all()
    contributions = pd.DataFrame(shap_all()[:, :-1], columns=list(model.feature_columns))
    shap_by_cause = pd.DataFrame(
        {cause: contributions[list(SHAP_CAUSE_FEATURES[cause])].sum(axis=1) for cause in CAUSES}
    )
    cf_top = drops.fillna(-np.inf).to_numpy().argmax(axis=1)
    has_cf = (drops.fillna(-np.inf).to_numpy().max(axis=1)) > 0
    shap_top = shap_by_cause.to_numpy().argmax(axis=1)
    agree = cf_top[has_cf] == shap_top[has_cf]
    return {
        "postings": n,
        "trees": model.booster.num_trees(),
        **cost,
        "postings_with_a_counterfactual_reason": int(has_cf.sum()),
        "top_cause_agreement": float(agree.mean()) if agree.size else float("nan"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--history", required=True)
    parser.add_argument("--model", default="models:/cancel-risk@champion")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--single-rows", type=int, default=200)
    args = parser.parse_args(argv)
    report = run(args.history, args.model, args.repeats, args.single_rows)
    for key, value in report.items():
        print(f"{key:<42} {value:,.4g}" if isinstance(value, float) else f"{key:<42} {value:,}")


if __name__ == "__main__":
    main()
