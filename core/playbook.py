"""The playbook and the facts its texts quote: what the seller reads about a reason.

The playbook (``playbook.yaml``, editable by the seller) maps each reason code to its title, the
facts shown and the actions, each decision to its text, and each what-if action
(:mod:`core.whatif`) to its title, in English, Chinese and Russian. It is checked when it is
loaded, down to filling every template with a sample order's values.
The values the facts quote are computed column by column from feature rows (:func:`fact_columns`)
and a template is filled for many orders at once (:func:`format_rows`).
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from core.counterfactuals import CAUSES, gt, lt

LANGUAGES = ("en", "zh", "ru")
# The reason of a medium- or high-risk order that no single cause explains: its risk is that of
# orders like it (carrier, region, payment), and no one fix would remove a noticeable part of it.
NO_SINGLE_CAUSE = "no_single_cause"
REASON_CODES = (*CAUSES, NO_SINGLE_CAUSE)
DECISIONS = ("ship", "contact_buyer", "hold_and_confirm")
# What the seller can do about one order, in the order the what-if answer lists them.
WHAT_IF_ACTIONS = (
    "refund_difference",
    "restore_card",
    "expedite",
    "switch_carrier",
    "confirm_with_buyer",
    "hold_and_confirm",
)
# The values a what-if title may quote, here with the sample its templates are checked against:
# the refund as money text, its currency's sign (or ISO code), the shop's usual carrier.
WHAT_IF_SAMPLE = {"amount": "¥40.00", "currency_sign": "¥", "carrier": "sample"}


# --- the playbook ------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Texts(_Strict):
    en: str
    zh: str
    ru: str

    def get(self, lang: str) -> str:
        return getattr(self, lang)


class ValueNames(_Strict):
    """A name Ozon gives in Russian (a payment type, a region, a carrier) in other languages."""

    en: str | None = None
    zh: str | None = None
    ru: str | None = None


# The fact values that are Ozon's own names, and their column in the fact values.
NAMED_VALUES = ("payment", "region", "carrier")


class CauseEntry(_Strict):
    title: Texts
    facts: dict[str, Texts]
    actions: list[Texts]


class WhatIfEntry(_Strict):
    """The title of a what-if action, and the variants that replace it where they apply."""

    title: Texts
    # Before the handover, where the action is another step (expedite: ship today).
    before_handover: Texts | None = None
    # When a value the title quotes is unknown: the refund's amount, the usual carrier.
    without_amount: Texts | None = None
    without_carrier: Texts | None = None

    def texts(self, *, handed_over: bool, amount_known: bool, carrier_known: bool) -> Texts:
        """The variant that fits an order (the title when no variant is given for its case)."""
        if not handed_over and self.before_handover is not None:
            return self.before_handover
        if not amount_known and self.without_amount is not None:
            return self.without_amount
        if not carrier_known and self.without_carrier is not None:
            return self.without_carrier
        return self.title

    def variants(self) -> dict[str, Texts]:
        return {name: texts for name, texts in self if isinstance(texts, Texts)}


class Playbook(_Strict):
    causes: dict[str, CauseEntry]
    decisions: dict[str, Texts]
    # Absent from a playbook written before it existed: the shipped playbook's entry is used.
    no_single_cause: CauseEntry | None = None
    # The same: an action this section leaves out (or the whole section) has the shipped title.
    what_if: dict[str, WhatIfEntry] | None = None
    # Ozon's names of payment types, regions and carriers in the seller's language; a name
    # this section leaves out is looked up in the shipped playbook's.
    value_names: dict[str, dict[str, ValueNames]] | None = None

    def entry(self, code: str) -> CauseEntry:
        """The entry of a reason code: a cause, or :data:`NO_SINGLE_CAUSE`."""
        if code != NO_SINGLE_CAUSE:
            return self.causes[code]
        return self.no_single_cause or _default_playbook().entry(code)

    def value_name(self, kind: str, value: str, lang: str) -> str:
        """``value`` (a payment type, region or carrier as Ozon names it) as the seller reads
        it in ``lang``: the translation with the original beside it, or the original alone
        when no translation is known (or it is the same)."""
        for table in (self.value_names, _default_playbook().value_names):
            names = (table or {}).get(kind, {}).get(value)
            name = None if names is None else getattr(names, lang)
            if name:
                return value if name == value else f"{name} ({value})"
        return value

    def named_values(self, values: FactColumns, lang: str) -> FactColumns:
        """The fact values with :data:`NAMED_VALUES` in ``lang`` (:meth:`value_name`)."""
        shown = dict(values)
        for kind in NAMED_VALUES:
            if kind in values:
                cache: dict[object, object] = {}
                shown[kind] = [
                    cache.setdefault(v, self.value_name(kind, v, lang) if isinstance(v, str) else v)
                    for v in values[kind]
                ]
        return shown

    def what_if_entry(self, action: str) -> WhatIfEntry:
        """The titles of a what-if action (:data:`WHAT_IF_ACTIONS`): this playbook's own, else
        the shipped playbook's."""
        own = (self.what_if or {}).get(action)
        if own is not None:
            return own
        shipped = _default_playbook().what_if
        assert shipped is not None, "the shipped playbook titles every what-if action"
        return shipped[action]

    @model_validator(mode="after")
    def _complete(self) -> Playbook:
        missing = [c for c in CAUSES if c not in self.causes]
        unknown = [c for c in self.causes if c not in CAUSES]
        if missing or unknown:
            raise ValueError(f"playbook causes: missing {missing}, unknown {unknown}")
        missing_decisions = [d for d in DECISIONS if d not in self.decisions]
        if missing_decisions:
            raise ValueError(f"playbook decisions missing: {missing_decisions}")
        unknown_kinds = [k for k in self.value_names or {} if k not in NAMED_VALUES]
        if unknown_kinds:
            raise ValueError(
                f"playbook value_names: unknown kinds {unknown_kinds}; known: "
                f"{', '.join(NAMED_VALUES)}"
            )
        unknown_actions = [a for a in self.what_if or {} if a not in WHAT_IF_ACTIONS]
        if unknown_actions:
            raise ValueError(
                f"playbook what_if: unknown actions {unknown_actions}; known: "
                f"{', '.join(WHAT_IF_ACTIONS)}"
            )
        for cause, fact_names in FACTS.items():
            entry = self.causes.get(cause) if cause in CAUSES else self.no_single_cause
            absent = [name for name in fact_names if entry and name not in entry.facts]
            if absent:
                raise ValueError(f"playbook cause {cause!r} lacks the facts {absent}")
        self._check_templates()
        return self

    def _check_templates(self) -> None:
        """Fill every template with a sample order's values, so that a misspelt value name or
        format stops the playbook's loading, not a scoring run an hour later."""
        sample = {name: column[0] for name, column in _sample_fact_columns().items()}
        entries = {**self.causes, NO_SINGLE_CAUSE: self.no_single_cause}
        for cause, entry in entries.items():
            for fact, texts in entry.facts.items() if entry else ():
                for lang in LANGUAGES:
                    where = f"playbook cause {cause!r} fact {fact!r} ({lang})"
                    _check_template(texts.get(lang), sample, where, "a fact value")
        for action, what_if in (self.what_if or {}).items():
            for variant, texts in what_if.variants().items():
                for lang in LANGUAGES:
                    where = f"playbook what_if {action!r} {variant} ({lang})"
                    _check_template(texts.get(lang), WHAT_IF_SAMPLE, where, "a what-if value")


def _check_template(template: str, sample: Mapping[str, object], where: str, kind: str) -> None:
    """``template`` filled with ``sample``, or a ValueError saying what in it cannot be."""
    try:
        template.format_map(sample)
    except KeyError as exc:
        raise ValueError(
            f"{where} quotes {{{exc.args[0]}}}, which is not {kind}; known: {', '.join(sample)}"
        ) from None
    except (ValueError, IndexError, AttributeError, TypeError) as exc:
        raise ValueError(f"{where}: the template {template!r} cannot be filled ({exc})") from None


def load_playbook(path: str | Path | None = None) -> Playbook:
    """The playbook at ``path``, or the one shipped with the package."""
    if path is None:
        return _default_playbook()
    try:
        return _parse_playbook(Path(path).read_text(encoding="utf-8"))
    except ValidationError as exc:
        problems = "; ".join(_describe_error(error) for error in exc.errors())
        raise ValueError(f"playbook {path} is not usable: {problems}") from None
    except (yaml.YAMLError, ValueError) as exc:
        raise ValueError(f"playbook {path} is not usable: {exc}") from None


def _describe_error(error: Mapping[str, Any]) -> str:
    """One validation error as the seller reads it: where in the file, and what is wrong."""
    message = str(error["msg"]).removeprefix("Value error, ")
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {message}" if where else message


@cache
def _default_playbook() -> Playbook:
    text = resources.files("core").joinpath("playbook.yaml").read_text(encoding="utf-8")
    return _parse_playbook(text)


def _parse_playbook(text: str) -> Playbook:
    return Playbook.model_validate(yaml.safe_load(text))


def percent_text(value: float, decimals: int = 0, space: str = " ") -> str:
    """A probability as a seller reads it: ``83 %``. A probability strictly between 0 and 1 is
    never shown as 0 % or 100 % (``<1 %``, ``>99 %``): no shop's history supports certainty."""
    if value != value:  # NaN
        return "?"
    text = f"{value * 100:.{decimals}f}"
    step = 10.0**-decimals
    if float(text) >= 100.0 and value < 1.0:
        return f">{100.0 - step:.{decimals}f}{space}%"
    if float(text) <= 0.0 and value > 0.0:
        return f"<{step:.{decimals}f}{space}%"
    return f"{text}{space}%"


# --- facts -------------------------------------------------------------------------------------

FACTS: dict[str, tuple[str, ...]] = {
    "price_drop": ("cheaper",),
    "late_delivery": ("late", "due", "moved"),
    "tracking_quiet": ("quiet", "stalled"),
    "not_shipped": ("waiting",),
    "listing_changed": ("edited",),
    "buyer_profile": ("payment", "earlier_cancels", "first_time", "region"),
    "early_remorse": ("recent",),
    "slow_carrier": ("record",),
    NO_SINGLE_CAUSE: ("profile",),
}


# The feature columns the facts quote: numbers, and names shown as they are.
FACT_NUMBER_COLUMNS = (
    "price_change_pct",
    "lowest_price_change_pct",
    "hours_to_promised_delivery_end",
    "delivery_date_changes",
    "hours_since_last_activity",
    "silent_hours_since_handover",
    "hours_since_order",
    "card_edits_since_purchase",
    "buyer_earlier_buyer_cancels",
    "buyer_earlier_postings",
    "carrier_buyer_cancel_rate",
)
FACT_TEXT_COLUMNS = ("payment_type", "region", "carrier")

# The values the fact templates quote, by name: one list per name, a row per order.
FactColumns = dict[str, list]


def fact_columns(
    numbers: Mapping[str, np.ndarray], texts: Mapping[str, Sequence[object]]
) -> FactColumns:
    """The values the fact templates quote, computed column by column.

    ``numbers`` holds :data:`FACT_NUMBER_COLUMNS` as float arrays (NaN: unknown), ``texts``
    holds :data:`FACT_TEXT_COLUMNS` as sequences of strings (None or NA: unknown, shown "?").
    Numbers come out as Python floats, which the templates format.
    """
    price_now = numbers["price_change_pct"]
    to_promise = numbers["hours_to_promised_delivery_end"]
    hours_since_order = numbers["hours_since_order"]
    overdue_days = -to_promise / 24.0
    columns: dict[str, np.ndarray | list] = {
        "price_pct": np.where(lt(price_now, -0.5), price_now, numbers["lowest_price_change_pct"]),
        "days_late": np.where(  # max(0, overdue) as Python's max gives it: never -0.0
            np.isnan(to_promise), np.nan, np.where(overdue_days > 0.0, overdue_days, 0.0)
        ),
        "days_to_promise": to_promise / 24.0,
        "date_changes": numbers["delivery_date_changes"],
        "quiet_days": numbers["hours_since_last_activity"] / 24.0,
        "silent_days": numbers["silent_hours_since_handover"] / 24.0,
        "days_since_order": hours_since_order / 24.0,
        "hours_since_order": hours_since_order,
        "edits": numbers["card_edits_since_purchase"],
        "earlier_cancels": numbers["buyer_earlier_buyer_cancels"],
        "earlier_postings": numbers["buyer_earlier_postings"],
        "payment": _shown(texts["payment_type"]),
        "region": _shown(texts["region"]),
        "carrier": _shown(texts["carrier"]),
        "carrier_cancel_pct": 100.0 * numbers["carrier_buyer_cancel_rate"],
    }
    return {
        name: column.tolist() if isinstance(column, np.ndarray) else column
        for name, column in columns.items()
    }


@cache
def _sample_fact_columns() -> FactColumns:
    """The fact values of one made-up order: what a template is checked against."""
    return fact_columns(
        {column: np.ones(1) for column in FACT_NUMBER_COLUMNS},
        {column: ["sample"] for column in FACT_TEXT_COLUMNS},
    )


def frame_fact_columns(features: pd.DataFrame) -> FactColumns:
    """:func:`fact_columns` of the rows of a feature frame."""
    return fact_columns(
        {c: features[c].to_numpy(dtype="float64", na_value=np.nan) for c in FACT_NUMBER_COLUMNS},
        {c: features[c].tolist() for c in FACT_TEXT_COLUMNS},
    )


def row_fact_columns(rows: Sequence[Mapping[str, Any]]) -> FactColumns:
    """:func:`fact_columns` of feature rows held as dicts (missing numbers None or NaN)."""
    return fact_columns(
        {
            c: np.array([np.nan if row[c] is None else row[c] for row in rows], dtype="float64")
            for c in FACT_NUMBER_COLUMNS
        },
        {c: [row[c] for row in rows] for c in FACT_TEXT_COLUMNS},
    )


def _shown(names: Sequence[object]) -> list[str]:
    return [name if isinstance(name, str) and name else "?" for name in names]


def held_facts(
    cause: str, columns: FactColumns, rows: np.ndarray, reference: Mapping[str, str]
) -> dict[str, np.ndarray]:
    """For each fact of ``cause`` (in the playbook's order), whether it holds at each row."""

    def numbers(name: str) -> np.ndarray:
        return np.asarray(columns[name], dtype="float64")[rows]

    def differs(name: str, reference_name: str) -> np.ndarray:
        if reference_name not in reference:
            return np.zeros(len(rows), dtype=bool)
        return np.asarray(columns[name], dtype=object)[rows] != reference[reference_name]

    if cause == "tracking_quiet":
        # Quiet now says it all; moving again after a silence, the silence is the fact.
        quiet = gt(numbers("quiet_days"), 2.0)
        return {"quiet": quiet, "stalled": ~quiet}
    if cause == "late_delivery":
        late = gt(numbers("days_late"), 0.0)
        return {"late": late, "due": ~late, "moved": gt(numbers("date_changes"), 0.0)}
    if cause == "buyer_profile":
        held = {
            "payment": differs("payment", "payment_type") | ("payment_type" not in reference),
            "earlier_cancels": gt(numbers("earlier_cancels"), 0.0),
            "first_time": numbers("earlier_postings") == 0.0,
            "region": differs("region", "region"),
        }
        held["payment"] |= ~np.logical_or.reduce(list(held.values()))  # the payment at least
        return held
    return {name: np.ones(len(rows), dtype=bool) for name in FACTS[cause]}


_FORMATTER = string.Formatter()


@cache
def _template_parts(template: str) -> tuple[tuple[str, str | None, str, str | None], ...] | None:
    """A template's literal texts and fields, or None when a field is more than a plain name
    (an attribute, an index, a nested format): such a template is formatted row by row."""
    parts = tuple(_FORMATTER.parse(template))
    for _, field, spec, _ in parts:
        if field is not None and (not field.isidentifier() or "{" in spec):
            return None
    return parts


_CONVERSIONS: dict[str | None, Callable[[object], object]] = {
    None: lambda value: value,
    "s": str,
    "r": repr,
    "a": ascii,
}


def format_rows(template: str, columns: FactColumns, rows: Sequence[int]) -> list[str]:
    """``template.format_map`` of the fact values of each row at ``rows``, field by field."""
    parts = _template_parts(template)
    if parts is None:
        return [template.format_map({k: v[row] for k, v in columns.items()}) for row in rows]
    pieces: list[Iterable[str]] = []
    for literal, field, spec, conversion in parts:
        if literal:
            pieces.append(itertools.repeat(literal, len(rows)))
        if field is not None:
            column, convert = columns[field], _CONVERSIONS[conversion]
            pieces.append([format(convert(column[row]), spec) for row in rows])
    return ["".join(texts) for texts in zip(*pieces, strict=True)] if pieces else [""] * len(rows)
