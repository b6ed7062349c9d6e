"""Product cards (products.jsonl, product info list items) -> the ``products`` table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from core.ingest.batches import Parsed, build_canonical, build_rejects
from core.ingest.values import build_integers, build_strings, build_utc_timestamps
from core.tables import PRODUCT_COLUMNS


def _card_reason(record: Any) -> str | None:
    if type(record) is not dict:
        return "product card: not a JSON object"
    offer_id = record.get("offer_id")
    if type(offer_id) is int or (type(offer_id) is str and offer_id.strip()):
        return None
    return "product card: no offer_id"


def build_products(records: Sequence[Any], lines: Sequence[int], file: str) -> Parsed:
    """One row per usable card; a card that is not an object or has no offer_id is a reject.

    Card timestamps that cannot be read are left empty and counted in ``unreadable_dates``.
    """
    lines = list(lines)
    reasons = [_card_reason(record) for record in records]
    kept = [r for r, reason in zip(records, reasons, strict=True) if reason is None]
    created_at, bad_created = build_utc_timestamps([r.get("created_at") for r in kept])
    updated_at, bad_updated = build_utc_timestamps([r.get("updated_at") for r in kept])
    frame = pd.DataFrame(
        {
            "offer_id": build_strings([r.get("offer_id") for r in kept]),
            "sku": build_integers([r.get("sku") for r in kept])[0],
            "name": build_strings([r.get("name") for r in kept]),
            "description_category_id": build_integers(
                [r.get("description_category_id") for r in kept]
            )[0],
            "type_id": build_integers([r.get("type_id") for r in kept])[0],
            "created_at": created_at,
            "updated_at": updated_at,
        }
    )
    rejected = [i for i, reason in enumerate(reasons) if reason is not None]
    rejects = build_rejects(file, [lines[i] for i in rejected], [str(reasons[i]) for i in rejected])
    return Parsed(
        source=file,
        frame=build_canonical(frame, PRODUCT_COLUMNS),
        rejects=rejects,
        records_read=len(lines),
        unreadable_dates=int(bad_created.sum() + bad_updated.sum()),
    )
