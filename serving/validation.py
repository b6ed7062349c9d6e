"""What makes a scoring request unusable, said as a field path and a readable message.

Three sources, one shape (:class:`FieldError`, rendered like FastAPI's own 422 entries):

- the ingestion's rejects (``tables_from_objects``): its reasons name the record and usually the
  key ("price '-5' of product 2 is negative", "price row: no offer_id"); :func:`reject_errors`
  turns them into paths such as ``body.posting.products[1].price`` or ``body.prices[3].offer_id``;
- plausibility of the posting's own dates (:func:`plausibility_errors`): handed to delivery or
  promised before it was ordered, ordered before 2000;
- whether the posting can be scored at ``as_of`` at all (:func:`not_open_error`): only postings
  open at ``as_of`` are scored, as in ``build_features``.

Messages quote the offending value the way the ingestion does; nothing here logs them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd

from core.tables import TERMINAL_STATUSES

Loc = tuple[str | int, ...]

EARLIEST_ORDER_AT = pd.Timestamp("2000-01-01", tz="UTC")
_NS_PER_SECOND = 1_000_000_000

# Ingestion reason prefixes -> the request part the record came from.
_PARTS = (
    ("price row: ", "prices"),
    ("scan row: ", "tracking"),
    ("product card: ", "products"),
    ("push: ", "pushes"),
)
_PUSH_PREFIX = re.compile(r"(TYPE_[A-Z_]+) push: ")
_PRODUCT_FIRST = re.compile(r"product (\d+) (?:has no (\w+)|is not an object)")
_PRODUCT_VALUE = re.compile(r"(\w+) '.*' of product (\d+) ")
_NAMED_VALUE = re.compile(r"(\w+) '")
_ABSENT = re.compile(r"(?:no|neither) (\w+)")


@dataclass(frozen=True)
class FieldError:
    """One problem of a request: where (``loc``), what (``msg``) and its kind (``type``)."""

    loc: Loc
    msg: str
    type: str

    def to_dict(self) -> dict[str, object]:
        return {"loc": list(self.loc), "msg": self.msg, "type": self.type}


class RequestRejected(Exception):
    """A request (or one batch item) that cannot be scored; carries its field errors."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__(f"{len(errors)} problem(s) in the request")
        self.errors = errors


def _field_of(message: str) -> tuple[str | int, ...]:
    """The key path inside one record that an ingestion reason names, if it names one."""
    absent = _ABSENT.match(message)
    if absent is not None:
        return (absent.group(1),)
    first = _PRODUCT_FIRST.match(message)
    if first is not None:
        position = int(first.group(1)) - 1
        return (
            ("products", position)
            if first.group(2) is None
            else (
                "products",
                position,
                first.group(2),
            )
        )
    value = _PRODUCT_VALUE.match(message)
    if value is not None:
        return ("products", int(value.group(2)) - 1, value.group(1))
    named = _NAMED_VALUE.match(message)
    if named is not None:
        return (named.group(1),)
    return ()


def reject_error(reason: str, line: int, prefix: Loc) -> FieldError:
    """One ingestion reject as a field error under ``prefix`` (``("body",)`` or a batch item).

    ``line`` is the record's 1-based position in its own list (``tables_from_objects``).
    """
    push = _PUSH_PREFIX.match(reason)
    if push is not None:
        message = reason[push.end() :]
        return FieldError(
            (*prefix, "pushes", line - 1, *_field_of(message)), reason, "value_error.record"
        )
    for text, part in _PARTS:
        if reason.startswith(text):
            message = reason[len(text) :]
            return FieldError(
                (*prefix, part, line - 1, *_field_of(message)), reason, "value_error.record"
            )
    if reason == "not a JSON object":
        return FieldError((*prefix, "posting"), "the posting must be a JSON object", "type_error")
    return FieldError((*prefix, "posting", *_field_of(reason)), reason, "value_error.posting")


def reject_errors(rejects: pd.DataFrame, prefix: Loc = ("body",)) -> list[FieldError]:
    """All rejects of a request's tables as field errors, postings first, in list order."""
    errors = [
        reject_error(str(reason), int(line), prefix)
        for line, reason in zip(rejects["line"], rejects["reason"], strict=True)
    ]
    return sorted(errors, key=lambda e: (e.loc[len(prefix)] != "posting", _sort_key(e.loc)))


def _sort_key(loc: Loc) -> tuple[str, ...]:
    return tuple(f"{part:09d}" if isinstance(part, int) else part for part in loc)


def _iso(ns: int) -> str:
    return pd.Timestamp(ns, tz="UTC").isoformat().replace("+00:00", "Z")


def plausibility_errors(
    ordered_at: int,
    handed_over_at: int | None,
    shipment_deadline_at: int | None,
    promised_begin_at: int | None,
    promised_end_at: int | None,
    prefix: Loc = ("body",),
) -> list[FieldError]:
    """Dates of the posting that cannot be true (times as UTC nanoseconds, None when absent)."""
    posting = (*prefix, "posting")
    analytics = (*posting, "analytics_data")
    errors = []
    if ordered_at < EARLIEST_ORDER_AT.value:
        errors.append(
            FieldError(
                (*posting, "in_process_at"),
                f"the order time {_iso(ordered_at)} is before {EARLIEST_ORDER_AT.date()}",
                "value_error.date",
            )
        )
    checks = (
        ((*posting, "delivering_date"), handed_over_at, "handed to delivery"),
        ((*posting, "shipment_date"), shipment_deadline_at, "due to be shipped"),
        ((*analytics, "delivery_date_begin"), promised_begin_at, "promised for delivery"),
        ((*analytics, "delivery_date_end"), promised_end_at, "promised for delivery"),
    )
    for loc, moment, what in checks:
        if moment is not None and moment < ordered_at:
            errors.append(
                FieldError(
                    loc,
                    f"{what} at {_iso(moment)}, before it was ordered ({_iso(ordered_at)})",
                    "value_error.date",
                )
            )
    if (
        promised_begin_at is not None
        and promised_end_at is not None
        and promised_begin_at > promised_end_at
    ):
        errors.append(
            FieldError(
                (*analytics, "delivery_date_begin"),
                "the promised delivery window begins after it ends",
                "value_error.date",
            )
        )
    return errors


def not_open_error(
    status: str | None,
    ordered_at: int,
    closed_at: int | None,
    closing_time_unknown: bool,
    as_of: int,
    prefix: Loc = ("body",),
) -> FieldError | None:
    """Why the posting is not open at ``as_of`` (None when it is): only open ones are scored."""
    posting = (*prefix, "posting")
    if ordered_at > as_of:
        return FieldError(
            (*posting, "in_process_at"),
            f"ordered at {_iso(ordered_at)}, after as_of ({_iso(as_of)}): nothing to score yet",
            "value_error.not_open",
        )
    if closing_time_unknown:
        return FieldError(
            (*posting, "status"),
            f"the posting is {status}: only open postings are scored",
            "value_error.not_open",
        )
    if closed_at is not None and closed_at <= as_of:
        return FieldError(
            (*posting, "status"),
            f"the posting was {status} at {_iso(closed_at)}, before as_of ({_iso(as_of)}): "
            "only open postings are scored",
            "value_error.not_open",
        )
    return None


def as_of_errors(as_of: int, now: int, max_skew_seconds: float, loc: Loc) -> list[FieldError]:
    """An ``as_of`` that cannot be meant: before 2000 or later than now (beyond clock skew)."""
    if as_of < EARLIEST_ORDER_AT.value:
        return [
            FieldError(loc, f"as_of must not be before {EARLIEST_ORDER_AT.date()}", "value_error")
        ]
    if as_of > now + int(max_skew_seconds * _NS_PER_SECOND):
        return [
            FieldError(
                loc,
                f"as_of {_iso(as_of)} is in the future (now {_iso(now)}): "
                "scores use only what is known at as_of",
                "value_error",
            )
        ]
    return []


def is_terminal(status: str | None) -> bool:
    return status in TERMINAL_STATUSES
