"""Request and response bodies of the REST service (the OpenAPI document is built from these).

The envelope is strict (unknown top-level keys are an error: a misspelt ``price`` would silently
drop a price log); the records inside it are the Seller API's and the contract's own shapes,
read by the project's one parser (``tables_from_objects``), so a seller forwards them untouched
and new keys in them never break a request.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
)

# The same values as core.playbook.LANGUAGES / DECISIONS and core.model.RISK_LEVELS
# (tests/test_serving_routes.py checks they agree), and core.playbook.WHAT_IF_ACTIONS and
# core.whatif.Basis (tests/test_whatif.py).
Lang = Literal["en", "zh", "ru"]
RiskLevel = Literal["low", "medium", "high"]
Decision = Literal["ship", "contact_buyer", "hold_and_confirm"]
WhatIfAction = Literal[
    "refund_difference",
    "restore_card",
    "expedite",
    "switch_carrier",
    "confirm_with_buyer",
    "hold_and_confirm",
]
WhatIfBasis = Literal["counterfactual", "assumed_effect"]

_EARLIEST_YEAR, _LATEST_YEAR = 2000, 2200

EXAMPLE_POSTING: dict[str, Any] = {
    "posting_number": "48213907-0114-1",
    "order_id": 680012345,
    "order_number": "48213907-0114",
    "status": "awaiting_deliver",
    "in_process_at": "2026-06-01T09:12:44.000000Z",
    "shipment_date": "2026-06-03T10:00:00Z",
    "delivering_date": None,
    "tracking_number": "",
    "delivery_method": {
        "id": 21000000024,
        "name": "Ozon Логистика",
        "warehouse_id": 1020000456789,
        "warehouse": "义乌仓 Yiwu",
        "tpl_provider_id": 24,
        "tpl_provider": "Ozon Логистика",
    },
    "cancellation": None,
    "products": [
        {
            "sku": 1500001514,
            "offer_id": "SKU-003-0040",
            "name": "Беспроводные наушники",
            "quantity": 1,
            "price": "170.720000",
            "currency_code": "CNY",
        }
    ],
    "analytics_data": {
        "region": "Москва",
        "city": "Москва",
        "delivery_type": "PVZ",
        "is_premium": False,
        "payment_type_group_name": "Банковская карта",
        "tpl_provider_id": 24,
        "delivery_date_begin": "2026-06-12T00:00:00Z",
        "delivery_date_end": "2026-06-16T00:00:00Z",
        "is_legal": False,
    },
    "customer": {"customer_id": 70000019},
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ScoreRequest(_Strict):
    """One posting and its own recent events, in the shapes the Seller API and the contract use."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "posting": EXAMPLE_POSTING,
                    "prices": [
                        {
                            "offer_id": "SKU-003-0040",
                            "at": "2026-06-02T08:00:00Z",
                            "price": "149.90",
                            "currency_code": "CNY",
                        }
                    ],
                    "pushes": [
                        {
                            "message_type": "TYPE_NEW_POSTING",
                            "posting_number": "48213907-0114-1",
                            "in_process_at": "2026-06-01T09:12:44Z",
                        }
                    ],
                    "tracking": [],
                    "as_of": "2026-06-02T12:00:00Z",
                    "lang": "en",
                }
            ]
        },
    )

    posting: dict[str, Any] = Field(
        description="The posting object exactly as the Seller API returns it (with "
        "analytics_data; financial_data and customer when available)."
    )
    prices: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Price-log rows of the posting's offers: offer_id, at, price "
        "[, old_price, currency_code].",
    )
    pushes: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Webhook pushes of the posting, and the card-edit pushes of its offers.",
    )
    tracking: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Carrier scans of the posting: posting_number, at, status [, location].",
    )
    as_of: datetime | None = Field(
        None,
        description="Score with what was known at this moment (ISO-8601; naive means UTC; "
        "microsecond precision). Default: now.",
    )
    lang: Lang = Field("en", description="Language of reasons and actions.")

    @field_validator("as_of")
    @classmethod
    def _plausible_moment(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        try:
            value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        except OverflowError:  # 0001-01-01T00:00+01:00 or 9999-12-31T23:59-01:00 in UTC
            raise ValueError(
                f"as_of must lie between {_EARLIEST_YEAR} and {_LATEST_YEAR}"
            ) from None
        if not _EARLIEST_YEAR <= value.year <= _LATEST_YEAR:
            raise ValueError(f"as_of must lie between {_EARLIEST_YEAR} and {_LATEST_YEAR}")
        return value


class InvalidItem:
    """A batch item that failed validation; scored as an error entry, not the whole batch."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors


def _item_or_error(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    try:
        return handler(value)
    except ValidationError as exc:
        return InvalidItem(
            [
                {"loc": list(error["loc"]), "msg": error["msg"], "type": error["type"]}
                for error in exc.errors(include_url=False, include_input=False)
            ]
        )


BatchItem = Annotated[ScoreRequest, WrapValidator(_item_or_error)]


class BatchRequest(_Strict):
    """Up to ``max_batch_postings`` (default 1,000) postings, scored independently."""

    items: list[BatchItem] = Field(
        description="Score requests; each is scored exactly as POST /v1/score would score it."
    )


class ErrorDetail(_Strict):
    loc: list[str | int] = Field(description="Path of the offending field, from the body root.")
    msg: str
    type: str


class ValidationErrorResponse(_Strict):
    detail: list[ErrorDetail]


class MessageResponse(_Strict):
    detail: str


class ReasonOut(_Strict):
    code: str = Field(
        description="price_drop, late_delivery, tracking_quiet, not_shipped, listing_changed, "
        "buyer_profile, early_remorse, slow_carrier, or no_single_cause (a medium or high risk "
        "that no one fix lowers: drop and share 0)"
    )
    share: float = Field(description="Part of this order's probability the cause accounts for.")
    risk_drop: float = Field(description="Probability removed if the cause were fixed.")
    facts: str = Field(description="The facts behind the cause, in the requested language.")
    values: dict[str, float] = Field(description="The numbers behind the facts.")


class ModelRef(_Strict):
    name: str
    version: str | None
    feature_version: str


class ScoreResponse(_Strict):
    posting_number: str
    as_of: datetime = Field(description="The moment the posting was scored at (UTC).")
    probability: float = Field(ge=0, le=1, description="Calibrated probability of a buyer cancel.")
    risk_level: RiskLevel
    reasons: list[ReasonOut] = Field(description="At most three causes that raise the risk.")
    actions: list[str]
    decision: Decision
    expected_saving: float = Field(description="Expected saving of the decision over shipping.")
    model: ModelRef


class WhatIfActionOut(_Strict):
    action: WhatIfAction = Field(
        description="refund_difference (fixes price_drop), restore_card (listing_changed), "
        "expedite (not_shipped before the handover; tracking_quiet and late_delivery after it), "
        "switch_carrier (slow_carrier), confirm_with_buyer, hold_and_confirm (before the "
        "handover only). Only the actions that fit the posting are listed."
    )
    title: str = Field(description="What to do, in the requested language.")
    basis: WhatIfBasis = Field(
        description="counterfactual: the model's score of the posting with the causes fixed; "
        "assumed_effect: the share of cancellations the intervention is assumed to prevent "
        "(the costs the decisions are priced with), which no feature shows the model."
    )
    probability_after: float = Field(ge=0, le=1, description="Probability after the action.")
    risk_level_after: RiskLevel
    risk_drop: float = Field(description="probability − probability_after (negative: higher).")
    amount: float | None = Field(
        description="The refund: the price difference today, in currency (refund only; null "
        "when unknown)."
    )
    currency: str | None = Field(description="ISO code of amount.")


class WhatIfResponse(_Strict):
    posting_number: str
    as_of: datetime = Field(description="The moment the posting was scored at (UTC).")
    probability: float = Field(
        ge=0, le=1, description="Probability now, as POST /v1/score gives it."
    )
    risk_level: RiskLevel
    currency: str | None = Field(description="The posting's currency (its products' code).")
    actions: list[WhatIfActionOut] = Field(description="The actions that fit, in a fixed order.")
    model: ModelRef


class BatchResult(_Strict):
    index: int = Field(description="Position of the item in the request.")
    status: Literal["scored", "rejected"]
    score: ScoreResponse | None = None
    errors: list[ErrorDetail] | None = None


class BatchResponse(_Strict):
    results: list[BatchResult]
    scored: int
    rejected: int
    model: ModelRef


class ModelInfo(_Strict):
    name: str
    version: str | None
    alias: str | None
    uri: str
    source: Literal["registry", "local_cache", "local_path"] = Field(
        description="local_cache: the tracking server could not be used at startup and the "
        "last model cached locally is served (see registry_error)."
    )
    feature_version: str
    run_id: str | None
    training_period: dict[str, str] | None
    holdout_metrics: dict[str, float]
    loaded_at: str
    registry_error: str | None
    scoring_path: Literal["fast", "reference"]
    fast_path_note: str | None


class ReloadResponse(_Strict):
    status: Literal["loaded", "unchanged", "refused", "not_found", "unreachable"]
    message: str
    previous_version: str | None
    model: ModelInfo | None


class HealthResponse(_Strict):
    status: Literal["ok"]


class ReadyResponse(_Strict):
    status: Literal["ready"]
    model_version: str | None
    source: str
    warnings: list[str] = Field(
        default_factory=list, description="What works but needs attention (a failing channel)."
    )
