"""The seller-cabinet orders export (orders.csv) -> posting and item rows.

One CSV row is one product line; rows are grouped into postings by «Номер отправления». The
export has no cancellation initiator, so a cancelled row is "unknown" unless the seller
declares that every cancellation in the file was the buyer's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.errors import HistoryError
from core.ingest.batches import (
    RECORD_SEQ,
    PostingBatch,
    build_canonical,
    build_rejects,
    empty_items,
)
from core.ingest.posting_rules import (
    build_early_order_mask,
    build_product_checks,
    normalise_words,
)
from core.ingest.values import (
    EARLIEST_ORDER_AT,
    build_cabinet_timestamps,
    build_decimals,
    build_integers,
    build_present_mask,
    build_strings,
)
from core.tables import ITEM_COLUMNS, POSTING_COLUMNS

POSTING_NUMBER = "Номер отправления"
ORDERED_AT = "Принят в обработку"
STATUS = "Статус"
QUANTITY = "Количество"

# canonical field -> header names, newest generation first. The first one present is read.
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "posting_number": (POSTING_NUMBER,),
    "order_number": ("Номер заказа",),
    "ordered_at": (ORDERED_AT,),
    "shipment_deadline_at": ("Дата отгрузки",),
    "status": (STATUS,),
    "delivered_at": ("Дата доставки",),
    "handed_over_at": ("Фактическая дата передачи в доставку",),
    "cancelled_at": ("Дата отмены",),
    "name": ("Название товара", "Наименование товара"),
    "sku": ("SKU", "OZON id"),
    "offer_id": ("Артикул",),
    # «Итоговая стоимость товара» of the older export is read as a unit price, like «Ваша цена».
    "unit_price": ("Ваша цена", "Итоговая стоимость товара"),
    "currency_code": ("Код валюты товара", "Код валюты отправления"),
    "quantity": (QUANTITY,),
    "old_price": ("Цена товара до скидок",),
    "discount_pct": ("Скидка %",),
    "promotions": ("Акции",),
    "region": ("Регион доставки",),
    "city": ("Город доставки",),
    "delivery_type": ("Способ доставки",),
    "delivery_method_name": ("Название метода",),
    "payment_type": ("Способ оплаты",),
    "carrier_name": ("Перевозчик",),
}

# Columns without which the file cannot be read at all.
REQUIRED_FIELDS = ("posting_number", "ordered_at", "status", "quantity", "unit_price")

# Cabinet status text (lower case, ё as е) -> API status code.
CABINET_STATUSES: dict[str, str] = {
    "ожидает регистрации": "awaiting_registration",
    "идет приемка": "acceptance_in_progress",
    "ожидает подтверждения": "awaiting_approve",
    "ожидает сборки": "awaiting_packaging",
    "ожидает упаковки": "awaiting_packaging",
    "ожидает отгрузки": "awaiting_deliver",
    "передается в доставку": "awaiting_deliver",
    "арбитраж": "arbitration",
    "клиентский арбитраж доставки": "client_arbitration",
    "доставляется": "delivering",
    "у водителя": "driver_pickup",
    "доставлен": "delivered",
    "доставлено": "delivered",
    "получен": "delivered",
    "отменен": "cancelled",
    "отменено": "cancelled",
    "не принят на сортировочном центре": "not_accepted",
}


def resolve_cabinet_columns(header: list[str], file: str) -> dict[str, str]:
    """Map canonical fields to this file's header names; stop if a required one is missing."""
    present = set(header)
    resolved = {
        field: next(name for name in names if name in present)
        for field, names in COLUMN_ALIASES.items()
        if any(name in present for name in names)
    }
    for field in REQUIRED_FIELDS:
        if field not in resolved:
            wanted = " or ".join(f"«{name}»" for name in COLUMN_ALIASES[field])
            raise HistoryError(f"{file}: required column {wanted} is missing")
    return resolved


def build_cabinet_statuses(text: pd.Series) -> tuple[pd.Series, dict[str, int]]:
    """API status codes for cabinet status text; unknown text is kept as written.

    Returns the statuses and the count of each unknown text, for a warning.
    """
    mapped = normalise_words(text).map(CABINET_STATUSES).astype("string")
    unknown = mapped.isna() & text.notna()
    counts = text[unknown].value_counts()
    return mapped.fillna(text), {str(k): int(v) for k, v in counts.items()}


def _column(frame: pd.DataFrame, columns: dict[str, str], field: str) -> pd.Series:
    """The raw text of a field, or an all-empty column when this generation lacks it."""
    if field in columns:
        return frame[columns[field]].reset_index(drop=True)
    return pd.Series([""] * len(frame), dtype=object)


def _order_time_reasons(raw: pd.Series) -> tuple[pd.Series, list[str | None]]:
    ordered_at, bad = build_cabinet_timestamps(raw)
    given = build_present_mask(raw)
    early = build_early_order_mask(ordered_at)
    reasons: list[str | None] = [None] * len(raw)
    for k in np.flatnonzero(~given | bad | early):
        if not given[k]:
            reasons[k] = f"no «{ORDERED_AT}»"
        elif bad[k]:
            reasons[k] = f"«{ORDERED_AT}» '{raw.iloc[k]}' is not a date"
        else:
            reasons[k] = f"«{ORDERED_AT}» '{raw.iloc[k]}' is before {EARLIEST_ORDER_AT.date()}"
    return ordered_at, reasons


@dataclass
class _PostingRows:
    """The rows that name a posting, grouped: each row's posting and product number."""

    rows: pd.DataFrame
    lines: np.ndarray
    problems: np.ndarray
    numbers: pd.Series
    posting_of_row: np.ndarray  # index into the heads, in order of first appearance
    product_no: np.ndarray  # 1-based position of the row within its posting
    head: np.ndarray  # mask: the first row of each posting

    @property
    def heads(self) -> pd.DataFrame:
        return self.rows[self.head].reset_index(drop=True)


def _group_rows(
    frame: pd.DataFrame,
    lines: np.ndarray,
    problems: np.ndarray,
    numbered: np.ndarray,
    numbers: pd.Series,
) -> _PostingRows:
    rows = frame[numbered].reset_index(drop=True)
    row_numbers = numbers[numbered].reset_index(drop=True)
    posting_of_row = pd.factorize(row_numbers)[0]
    product_no = pd.Series(posting_of_row).groupby(posting_of_row).cumcount().to_numpy() + 1
    return _PostingRows(
        rows=rows,
        lines=lines[numbered],
        problems=problems[numbered],
        numbers=row_numbers,
        posting_of_row=posting_of_row,
        product_no=product_no,
        head=~row_numbers.duplicated().to_numpy(),
    )


def _row_problem_reasons(
    grouped: _PostingRows, n_postings: int
) -> tuple[list[str | None], np.ndarray]:
    """Per posting, the first broken row's problem and line (else its first row's line)."""
    reasons: list[str | None] = [None] * n_postings
    reject_lines = grouped.lines[grouped.head].copy()
    for r in np.flatnonzero(pd.notna(grouped.problems)):
        k = int(grouped.posting_of_row[r])
        if reasons[k] is None:
            reasons[k] = str(grouped.problems[r])
            reject_lines[k] = grouped.lines[r]
    return reasons, reject_lines


def _build_cabinet_postings(
    heads: pd.DataFrame,
    columns: dict[str, str],
    numbers: pd.Series,
    ordered_at: pd.Series,
    lines: np.ndarray,
    file: str,
    cancellations_are_buyer: bool,
) -> tuple[pd.DataFrame, int, dict[str, int]]:
    """Posting rows from each posting's first CSV row; unreadable dates; unknown statuses."""
    status, unknown_statuses = build_cabinet_statuses(
        build_strings(_column(heads, columns, "status"))
    )
    cancelled_at, _ = build_cabinet_timestamps(_column(heads, columns, "cancelled_at"))
    cancelled = (status.eq("cancelled").fillna(False) | cancelled_at.notna()).to_numpy(dtype=bool)
    who = "buyer" if cancellations_are_buyer else "unknown"
    dates = {
        field: build_cabinet_timestamps(_column(heads, columns, field))
        for field in ("shipment_deadline_at", "handed_over_at", "delivered_at")
    }
    unreadable = int(sum(bad.sum() for _, bad in dates.values()))
    text = {
        field: build_strings(_column(heads, columns, field))
        for field in (
            "order_number",
            "region",
            "city",
            "delivery_type",
            "delivery_method_name",
            "payment_type",
            "carrier_name",
        )
    }
    postings = pd.DataFrame(
        {
            "posting_number": numbers,
            **text,
            "scheme": "cabinet_csv",
            "status": status,
            "ordered_at": ordered_at,
            **{field: parsed for field, (parsed, _) in dates.items()},
            "cancelled_by": pd.Series(np.where(cancelled, who, None), dtype="string"),
            "cancelled_at": cancelled_at,
            "source_file": file,
            "source_line": lines,
        }
    )
    return build_canonical(postings, POSTING_COLUMNS), unreadable, unknown_statuses


def build_cabinet_posting_batch(
    frame: pd.DataFrame,
    lines: np.ndarray,
    file: str,
    *,
    cancellations_are_buyer: bool = False,
    row_problems: np.ndarray | None = None,
) -> tuple[PostingBatch, dict[str, int]]:
    """Parse the rows of orders.csv (all text, ``""`` for empty) into posting and item rows.

    ``lines`` is each row's line in the file; ``row_problems`` marks rows the reader found
    broken (a wrong number of fields), which rejects their whole posting. A posting takes
    the line of its first row. Returns the batch and the unknown status texts with counts.
    """
    columns = resolve_cabinet_columns(list(frame.columns), file)
    frame = frame.reset_index(drop=True)
    lines = np.asarray(lines, dtype=np.int64)
    problems = (
        np.full(len(frame), None, dtype=object)
        if row_problems is None
        else np.asarray(row_problems, dtype=object)
    )
    numbers = build_strings(_column(frame, columns, "posting_number"))
    numbered = numbers.notna().to_numpy()
    grouped = _group_rows(frame, lines, problems, numbered, numbers)
    heads = grouped.heads
    n_postings = len(heads)

    problem_reasons, reject_lines = _row_problem_reasons(grouped, n_postings)
    ordered_at, time_reasons = _order_time_reasons(_column(heads, columns, "ordered_at"))
    prices, quantities, value_reasons = build_product_checks(
        _column(grouped.rows, columns, "unit_price"),
        _column(grouped.rows, columns, "quantity"),
        grouped.posting_of_row,
        grouped.product_no,
        n_postings,
    )
    reasons = [
        next((r for r in candidates if r is not None), None)
        for candidates in zip(problem_reasons, time_reasons, value_reasons, strict=True)
    ]
    keep = np.asarray([r is None for r in reasons], dtype=bool)
    seqs = np.arange(n_postings, dtype=np.int64)

    postings, unreadable, unknown_statuses = _build_cabinet_postings(
        heads,
        columns,
        grouped.numbers[grouped.head].reset_index(drop=True),
        ordered_at,
        grouped.lines[grouped.head],
        file,
        cancellations_are_buyer,
    )
    postings = postings[keep].reset_index(drop=True)
    postings[RECORD_SEQ] = seqs[keep]

    row_kept = keep[grouped.posting_of_row]
    if row_kept.any():
        items = _build_items(
            grouped.rows, columns, grouped.numbers, grouped.product_no, prices, quantities
        )
        items = build_canonical(items[row_kept].reset_index(drop=True), ITEM_COLUMNS)
        items[RECORD_SEQ] = seqs[grouped.posting_of_row[row_kept]]
    else:
        items = empty_items()

    unnumbered = np.flatnonzero(~numbered)
    rejected = np.flatnonzero(~keep)
    unnumbered_reasons = [
        "no posting_number" if problems[i] is None else str(problems[i]) for i in unnumbered
    ]
    rejects = build_rejects(
        file,
        [*lines[unnumbered].tolist(), *reject_lines[rejected].tolist()],
        [*unnumbered_reasons, *(str(reasons[k]) for k in rejected)],
    ).sort_values("line", kind="stable", ignore_index=True)
    batch = PostingBatch(
        source=file,
        frame=postings,
        rejects=rejects,
        records_read=n_postings + len(unnumbered),
        unreadable_dates=unreadable,
        items=items,
    )
    return batch, unknown_statuses


def _build_items(
    rows: pd.DataFrame,
    columns: dict[str, str],
    numbers: pd.Series,
    product_no: np.ndarray,
    prices: pd.Series,
    quantities: pd.Series,
) -> pd.DataFrame:
    old_price, _ = build_decimals(_column(rows, columns, "old_price"))
    discount, _ = build_decimals(_column(rows, columns, "discount_pct"))
    promotions = build_strings(_column(rows, columns, "promotions"))
    has_promotion = promotions.notna() if "promotions" in columns else pd.NA
    return pd.DataFrame(
        {
            "posting_number": numbers,
            "line_no": product_no - 1,
            "sku": build_integers(_column(rows, columns, "sku"))[0],
            "offer_id": build_strings(_column(rows, columns, "offer_id")),
            "name": build_strings(_column(rows, columns, "name")),
            "quantity": quantities.reset_index(drop=True),
            "unit_price": prices.reset_index(drop=True),
            "currency_code": build_strings(_column(rows, columns, "currency_code")),
            "old_price": old_price.where(old_price > 0),
            "discount_pct": discount,
            "has_promotion": has_promotion,
        }
    )
