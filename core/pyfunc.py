"""The MLflow model: the whole scoring pipeline behind one pyfunc ``predict``.

Raw input is a DataFrame, one row per posting to score:

- ``posting`` (required): the Seller API posting object as a JSON string (as the API gives it);
- ``prices``, ``pushes``, ``tracking`` (optional): JSON arrays as strings, the posting's own
  events in the shapes of the contract's files (price log rows of its offers as objects, its
  webhook pushes and the card-edit pushes of its offers, its carrier scans as objects);
- ``as_of`` (optional): ISO-8601 moment to score at; now when missing.

Output, in input order: ``posting_number``, ``probability`` (calibrated), ``risk_level``. A
posting that is not open at its ``as_of`` (or that ingestion rejects) gets a NaN probability
and no level.

The records are parsed by the ingestion's ``tables_from_objects`` and scored by
:meth:`RiskModel.score_tables`, i.e. the same ``build_features`` as training and the batch,
with the aggregates learned in training. Batch jobs and the REST service that already hold
tables call ``loaded.unwrap_python_model().risk_model.score_tables`` directly.

The model is logged "from code" (MLflow 3's recommended way, no cloudpickle): MLflow runs
:data:`MODEL_CODE` at load time, which builds :class:`CancelRiskPythonModel`; the model files
themselves are a plain-file :class:`RiskModel` directory passed as an artifact.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import mlflow
import numpy as np
import orjson
import pandas as pd
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import ColSpec, Schema

from core.ingest import tables_from_objects
from core.model import RISK_MODEL_ARTIFACT, RiskModel, risk_model_files
from core.tables import TERMINAL_STATUSES, HistoryTables

logger = logging.getLogger(__name__)

INPUT_COLUMNS = ("posting", "prices", "pushes", "tracking", "as_of")
OUTPUT_COLUMNS = ("posting_number", "probability", "risk_level")
INPUT_SOURCE = "pyfunc"

# The file MLflow executes to build the model when it loads it ("models from code").
MODEL_CODE = '''"""MLflow model-from-code entry point of the cancel-risk scoring pipeline."""

import mlflow

from core.pyfunc import CancelRiskPythonModel

mlflow.models.set_model(CancelRiskPythonModel())
'''

# Events of one kind kept per posting in an input example: enough to be realistic, small to log.
_EXAMPLE_EVENTS_PER_KIND = 20


class CancelRiskPythonModel(mlflow.pyfunc.PythonModel):
    """Parses raw Seller API records, builds features and scores them with a :class:`RiskModel`."""

    risk_model: RiskModel

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.risk_model = RiskModel.load(context.artifacts[RISK_MODEL_ARTIFACT])

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        return score_records(self.risk_model, pd.DataFrame(model_input))


def load_risk_model(model_uri: str) -> RiskModel:
    """The :class:`RiskModel` logged inside a cancel-risk pyfunc (``models:/cancel-risk@champion``,
    ``runs:/...``, a local directory), read from its plain files by this code.

    Nothing the model logged is run: a model logged by an older layout of the project loads the
    same (its feature version is checked as always), and the registry cannot hand code to the
    service or the batch.
    """
    with tempfile.TemporaryDirectory(prefix="cancel-risk-model-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
        return RiskModel.load(risk_model_files(local))


def score_records(
    risk_model: RiskModel, records: pd.DataFrame, now: pd.Timestamp | None = None
) -> pd.DataFrame:
    """Score raw input rows (see the module docstring); one output row per input row, in order.

    Rows sharing an ``as_of`` are parsed into one set of tables and scored in one call.
    """
    if "posting" not in records.columns:
        raise ValueError("the input needs a 'posting' column (a Seller API posting as JSON)")
    now = now if now is not None else pd.Timestamp.now(tz="UTC")
    postings = [
        _as_object(value, f"row {i}: 'posting'", dict) for i, value in enumerate(records["posting"])
    ]
    moments = [_as_of_or(value, now) for value in _column_or_none(records, "as_of")]
    rows_by_moment: dict[pd.Timestamp, list[int]] = {}
    for row, moment in enumerate(moments):
        rows_by_moment.setdefault(moment, []).append(row)
    scores: dict[tuple[str, pd.Timestamp], tuple[float, Any]] = {}
    for moment, rows in rows_by_moment.items():
        tables = build_tables_from_records(records, rows, postings)
        scored = risk_model.score_tables(tables, moment)
        for number, p, level in scored.itertuples(index=False, name=None):
            scores[(number, moment)] = (float(p), level)
    numbers = [str(p.get("posting_number", "")) for p in postings]
    not_scored = (np.nan, pd.NA)
    found = [scores.get(key, not_scored) for key in zip(numbers, moments, strict=True)]
    return pd.DataFrame(
        {
            "posting_number": pd.array(numbers, dtype="string"),
            "probability": np.array([f[0] for f in found], dtype="float64"),
            "risk_level": pd.array([f[1] for f in found], dtype="string"),
        }
    )


def build_tables_from_records(
    records: pd.DataFrame, rows: Sequence[int], postings: Sequence[dict[str, Any]]
) -> HistoryTables:
    """The normalised tables of the given input rows (postings and all their events)."""
    events: dict[str, list[dict[str, Any]]] = {}
    for column in ("prices", "pushes", "tracking"):
        values = _column_or_none(records, column)
        events[column] = [
            event
            for i in rows
            for event in _as_object(values[i], f"row {i}: '{column}'", list, default=[])
        ]
    return tables_from_objects(
        [postings[i] for i in rows],
        pushes=events["pushes"],
        prices=events["prices"],
        tracking=events["tracking"],
        source=INPUT_SOURCE,
    )


def _column_or_none(records: pd.DataFrame, column: str) -> list[Any]:
    if column not in records.columns:
        return [None] * len(records)
    return records[column].tolist()


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip() == ""
    return bool(np.ndim(value) == 0 and pd.isna(value))


def _as_object(value: Any, where: str, kind: type, default: Any = None) -> Any:
    """A JSON string (or an already-parsed object) of the expected ``kind``."""
    if _is_missing(value):
        if default is None:
            raise ValueError(f"{where} is missing")
        return default
    if isinstance(value, str | bytes):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(value, kind):
        raise ValueError(f"{where} must be a JSON {'object' if kind is dict else 'array'}")
    return value


def _as_of_or(value: Any, now: pd.Timestamp) -> pd.Timestamp:
    if _is_missing(value):
        return now
    moment = pd.Timestamp(value)
    return moment.tz_localize("UTC") if moment.tzinfo is None else moment.tz_convert("UTC")


# --- signature and input example -----------------------------------------------------------


def build_signature() -> ModelSignature:
    """The raw-record input schema and the score output schema."""
    inputs = Schema(
        [ColSpec("string", "posting")]
        + [ColSpec("string", name, required=False) for name in INPUT_COLUMNS[1:]]
    )
    outputs = Schema(
        [
            ColSpec("string", "posting_number"),
            ColSpec("double", "probability"),
            ColSpec("string", "risk_level"),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def build_input_example(
    tables: HistoryTables, posting_numbers: Iterable[str], as_of: pd.Timestamp
) -> pd.DataFrame:
    """Raw input rows for postings of ``tables``, rendered back into the contract's shapes.

    Only what was known at ``as_of`` is rendered: the posting's events up to ``as_of`` (the
    latest few of each kind), its offers' price rows and card edits.
    """
    numbers = list(posting_numbers)
    postings = tables.postings.set_index("posting_number", drop=False)
    items = tables.items[tables.items["posting_number"].isin(numbers)]
    events = tables.events[tables.events["at"] <= as_of]
    rows = []
    for number in numbers:
        own_items = items[items["posting_number"] == number]
        offers = set(own_items["offer_id"].dropna())
        own = events[events["posting_number"] == number]
        offer_events = events[events["offer_id"].isin(offers)]
        rows.append(
            {
                "posting": _dumps(build_posting_object(postings.loc[number], own_items, as_of)),
                "prices": _dumps(_price_rows(offer_events[offer_events["kind"] == "price"])),
                "pushes": _dumps(_push_objects(own, offer_events)),
                "tracking": _dumps(_scan_rows(own[own["kind"] == "carrier_scan"])),
                "as_of": _iso(as_of),
            }
        )
    return pd.DataFrame(rows, columns=list(INPUT_COLUMNS))


def build_posting_object(
    posting: pd.Series, items: pd.DataFrame, as_of: pd.Timestamp
) -> dict[str, Any]:
    """A Seller API posting object (the contract's keys) from a normalised posting row.

    The status is the one at ``as_of``: a posting that closed later is shown in its open stage.
    """
    items = items.sort_values("line_no")
    carrier = {
        "tpl_provider_id": _value(posting["carrier_id"]),
        "tpl_provider": _value(posting["carrier_name"]) or "",
    }
    financial = [
        {
            "product_id": _value(item["sku"]),
            "price": _value(item["unit_price"]),
            "old_price": _value(item["old_price"]),
            "total_discount_percent": _value(item["discount_pct"]),
            "actions": ["promotion"] if _value(item["has_promotion"]) else [],
        }
        for _, item in items.iterrows()
    ]
    customer_id = _value(posting["customer_id"])
    return {
        "posting_number": str(posting["posting_number"]),
        "order_id": _value(posting["order_id"]),
        "order_number": _value(posting["order_number"]) or "",
        "status": _status_at(posting, as_of),
        "in_process_at": _iso(posting["ordered_at"]),
        "shipment_date": _iso(posting["shipment_deadline_at"]),
        "delivering_date": _iso(_known_by(posting["handed_over_at"], as_of)),
        "tracking_number": _value(posting["tracking_number"]) or "",
        "delivery_method": {
            "id": _value(posting["delivery_method_id"]),
            "name": _value(posting["delivery_method_name"]) or "",
            "warehouse_id": _value(posting["warehouse_id"]),
            "warehouse": "",
            **carrier,
        },
        "cancellation": None,
        "products": [
            {
                "sku": _value(item["sku"]),
                "offer_id": _value(item["offer_id"]),
                "name": _value(item["name"]) or "",
                "quantity": _value(item["quantity"]),
                "price": f"{float(item['unit_price']):.6f}",
                "currency_code": _value(item["currency_code"]) or "RUB",
            }
            for _, item in items.iterrows()
        ],
        "analytics_data": {
            "region": _value(posting["region"]),
            "city": _value(posting["city"]),
            "delivery_type": _value(posting["delivery_type"]),
            "is_premium": _value(posting["is_premium"]),
            "payment_type_group_name": _value(posting["payment_type"]),
            "warehouse_id": _value(posting["warehouse_id"]),
            "delivery_date_begin": _iso(posting["promised_delivery_begin_at"]),
            "delivery_date_end": _iso(posting["promised_delivery_end_at"]),
            "is_legal": _value(posting["is_legal"]),
            **carrier,
        },
        "financial_data": {"products": financial},
        "customer": {"customer_id": customer_id} if customer_id is not None else None,
    }


def _known_by(moment: Any, as_of: pd.Timestamp) -> Any:
    """``moment`` if it had happened by ``as_of``, else missing."""
    return moment if pd.notna(moment) and moment <= as_of else None


def _status_at(posting: pd.Series, as_of: pd.Timestamp) -> str:
    """The exported status if the posting had closed by ``as_of``, else the open stage then."""
    closed_at = [posting[c] for c in ("delivered_at", "cancelled_at") if pd.notna(posting[c])]
    status = _value(posting["status"])
    if status is not None and (
        status not in TERMINAL_STATUSES or min(closed_at, default=as_of) <= as_of
    ):
        return status
    handed_over = _known_by(posting["handed_over_at"], as_of)
    return "awaiting_packaging" if handed_over is None else "delivering"


def _push_objects(own: pd.DataFrame, offer_events: pd.DataFrame) -> list[dict[str, Any]]:
    pushes: list[dict[str, Any]] = []
    for _, event in _latest(own[own["kind"] == "state_change"]).iterrows():
        pushes.append(
            {
                "message_type": "TYPE_STATE_CHANGED",
                "posting_number": event["posting_number"],
                "new_state": _value(event["state"]),
                "changed_state_date": _iso(event["at"]),
            }
        )
    for _, event in _latest(own[own["kind"] == "delivery_date_change"]).iterrows():
        pushes.append(
            {
                "message_type": "TYPE_DELIVERY_DATE_CHANGED",
                "posting_number": event["posting_number"],
                "new_delivery_date_begin": _iso(event["delivery_begin_at"]),
                "new_delivery_date_end": _iso(event["delivery_end_at"]),
                "old_delivery_date_begin": _iso(event["old_delivery_begin_at"]),
                "old_delivery_date_end": _iso(event["old_delivery_end_at"]),
                # Ozon's push has no time of its own: the archive's receipt stamp dates it.
                "received_at": _iso(event["at"]),
            }
        )
    for _, event in _latest(offer_events[offer_events["kind"] == "card_edit"]).iterrows():
        pushes.append(
            {
                "message_type": "TYPE_CREATE_OR_UPDATE_ITEM",
                "offer_id": event["offer_id"],
                "product_id": _value(event["sku"]),
                "is_error": False,
                "changed_at": _iso(event["at"]),
            }
        )
    return pushes


def _price_rows(events: pd.DataFrame) -> list[dict[str, Any]]:
    return [
        {
            "offer_id": event["offer_id"],
            "at": _iso(event["at"]),
            "price": _value(event["price"]),
            "old_price": _value(event["old_price"]),
            "currency_code": _value(event["currency_code"]),
        }
        for _, event in _latest(events).iterrows()
    ]


def _scan_rows(events: pd.DataFrame) -> list[dict[str, Any]]:
    return [
        {
            "posting_number": event["posting_number"],
            "at": _iso(event["at"]),
            "status": _value(event["state"]),
            "location": _value(event["location"]),
        }
        for _, event in _latest(events).iterrows()
    ]


def _latest(events: pd.DataFrame) -> pd.DataFrame:
    return events.sort_values("at", kind="stable").tail(_EXAMPLE_EVENTS_PER_KIND)


def _value(value: Any) -> Any:
    """A JSON-ready scalar: NA becomes None, numpy scalars become Python ones."""
    if value is None or (np.ndim(value) == 0 and pd.isna(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


def _iso(value: Any) -> str | None:
    if value is None or pd.isna(value):
        return None
    return pd.Timestamp(value).tz_convert("UTC").isoformat().replace("+00:00", "Z")


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()
