"""tables_from_objects: the REST path parses records exactly as the file path does."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from core.ingest import load_history, tables_from_objects
from core.ingest.postings import STATUS_PROGRESS

FIXTURES = Path(__file__).parent / "fixtures" / "ingest"

POSTING = {
    "posting_number": "R-1",
    "order_id": 42,
    "status": "awaiting_deliver",
    "in_process_at": "2026-04-10T08:15:00Z",
    "delivery_method": {"id": 1, "tpl_provider_id": 24, "tpl_provider": "Ozon Логистика"},
    "cancellation": None,
    "analytics_data": None,
    "products": [{"sku": 7, "offer_id": "A-7", "price": "990.000000", "quantity": 1}],
}


def test_a_request_with_every_kind_of_record() -> None:
    tables = tables_from_objects(
        [POSTING],
        pushes=[
            {
                "message_type": "TYPE_STATE_CHANGED",
                "posting_number": "R-1",
                "new_state": "posting_transferring_to_delivery",
                "changed_state_date": "2026-04-11T09:00:00Z",
            }
        ],
        prices=[
            {"offer_id": "A-7", "at": "2026-04-01T00:00:00Z", "price": "1 090,00"},
            {"offer_id": "A-7", "at": "2026-04-12T00:00:00Z", "price": 890, "currency_code": "RUB"},
        ],
        tracking=[{"posting_number": "R-1", "at": "2026-04-11T10:00:00Z", "status": "принят"}],
        products=[{"offer_id": "A-7", "sku": 7, "name": "Лампа", "type_id": 3}],
        source="score-request",
    )
    assert tables.postings["posting_number"].tolist() == ["R-1"]
    assert tables.items["unit_price"].tolist() == [990.0]
    assert tables.events.groupby("kind").size().to_dict() == {
        "carrier_scan": 1,
        "price": 2,
        "state_change": 1,
    }
    assert tables.events.loc[tables.events["kind"] == "price", "price"].tolist() == [1090.0, 890.0]
    assert tables.products["type_id"].tolist() == [3]
    assert tables.report.files_read == {
        "score-request": 1,
        "score-request:pushes": 1,
        "score-request:prices": 2,
        "score-request:tracking": 1,
        "score-request:products": 1,
    }
    assert len(tables.rejects) == 0


def test_bad_records_are_rejects_with_their_index_never_exceptions() -> None:
    tables = tables_from_objects(
        [POSTING, {"posting_number": "R-2"}, "not a posting"],
        pushes=[{"message_type": "TYPE_POSTING_CANCELLED", "posting_number": "R-1"}],
        prices=[{"offer_id": "A-7", "at": "2026-04-01T00:00:00Z", "price": "abc"}, 5],
        tracking=[{"at": "2026-04-11T10:00:00Z", "status": "x"}],
        products=[{"name": "no offer"}],
    )
    assert tables.rejects.to_dict("records") == [
        {"file": "request", "line": 2, "reason": "no in_process_at"},
        {"file": "request", "line": 3, "reason": "not a JSON object"},
        {
            "file": "request",
            "line": 1,
            "reason": "TYPE_POSTING_CANCELLED push: no changed_state_date",
        },
        {"file": "request", "line": 1, "reason": "price row: price 'abc' is not a number"},
        {"file": "request", "line": 2, "reason": "price row: not an object"},
        {"file": "request", "line": 1, "reason": "scan row: no posting_number"},
        {"file": "request", "line": 1, "reason": "product card: no offer_id"},
    ]
    assert tables.postings["posting_number"].tolist() == ["R-1"]


def test_objects_parse_exactly_like_the_same_lines_in_a_file(tmp_path: Path) -> None:
    """Parity of the REST path and the file path on the shop fixture's postings."""
    records = []
    for line in (FIXTURES / "shop" / "postings.jsonl").read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    (tmp_path / "postings.jsonl").write_bytes(b"\n".join(orjson.dumps(r) for r in records))
    from_file = load_history(tmp_path)
    from_objects = tables_from_objects(records, source="postings.jsonl")
    pd.testing.assert_frame_equal(from_objects.postings, from_file.postings)
    pd.testing.assert_frame_equal(from_objects.items, from_file.items)
    pd.testing.assert_frame_equal(from_objects.rejects, from_file.rejects)
    assert len(from_file.rejects) == 6 and from_file.report.duplicates_merged == 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
field_values = st.one_of(
    json_values,
    st.sampled_from(["", "2026-04-10T08:15:00Z", "abc", "1390.000000", "-1", "0", "cancelled"]),
)
posting_like = st.fixed_dictionaries(
    {},
    optional={
        key: field_values
        for key in (
            "posting_number",
            "status",
            "in_process_at",
            "created_at",
            "order_id",
            "delivery_method",
            "analytics_data",
            "cancellation",
            "customer",
            "financial_data",
        )
    },
).flatmap(
    lambda base: st.fixed_dictionaries(
        {
            "products": st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={k: field_values for k in ("price", "quantity", "sku", "offer_id")},
                ),
                max_size=3,
            )
            | field_values
        }
    ).map(lambda extra: {**base, **extra})
)


@settings(max_examples=40, deadline=None)
@given(records=st.lists(posting_like | json_values, max_size=6))
def test_any_json_is_parsed_without_error_and_every_record_is_accounted_for(
    records: list[Any],
) -> None:
    tables = tables_from_objects(records)
    report = tables.report
    assert report.postings_read == len(records)
    assert report.postings_read == (
        report.postings_kept + report.postings_rejected + report.duplicates_merged
    )
    assert len(tables.rejects) == report.postings_rejected
    assert tables.postings["posting_number"].is_unique
    assert tables.postings["ordered_at"].notna().all()


def _version(number: str, status: str, tracking: str) -> dict[str, Any]:
    return {
        **POSTING,
        "posting_number": number,
        "status": status,
        "tracking_number": tracking,
    }


@settings(max_examples=25, deadline=None)
@given(statuses=st.lists(st.sampled_from(sorted(STATUS_PROGRESS)), min_size=1, max_size=5))
def test_the_most_progressed_record_wins_whatever_the_order(statuses: list[str]) -> None:
    records = [_version("D-1", status, f"T{i}") for i, status in enumerate(statuses)]
    tables = tables_from_objects(records)
    best = max(STATUS_PROGRESS[s] for s in statuses)
    # Between records of equal progress the later one wins.
    winner = max(i for i, s in enumerate(statuses) if STATUS_PROGRESS[s] == best)
    row = tables.postings.iloc[0]
    assert len(tables.postings) == 1
    assert row["status"] == statuses[winner]
    assert row["tracking_number"] == f"T{winner}"
    assert tables.report.duplicates_merged == len(statuses) - 1
