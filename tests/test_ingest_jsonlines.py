"""JSON Lines in byte ranges and worker processes give exactly the one-pass result."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from core.ingest.assemble import build_history_tables
from core.ingest.jsonlines import (
    load_json_lines_batches,
    parse_json_lines_range,
    shift_lines,
    split_at_line_starts,
)

FIXTURES = Path(__file__).parent / "fixtures" / "ingest"


@settings(max_examples=50, deadline=None)
@given(
    lines=st.lists(st.text(alphabet='ab{}" 1', max_size=12), max_size=12),
    parts=st.integers(min_value=1, max_value=6),
)
def test_ranges_cover_the_file_and_start_at_line_starts(
    tmp_path_factory, lines: list[str], parts: int
) -> None:
    path = tmp_path_factory.mktemp("split") / "f.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    data = path.read_bytes()
    ranges = split_at_line_starts(path, parts)
    assert b"".join(data[start:stop] for start, stop in ranges) == data
    assert all(start == 0 or data[start - 1 : start] == b"\n" for start, _ in ranges)


def _lines_of(batches) -> tuple[list[int], list[int]]:
    rejects = [int(x) for b in batches for x in b.rejects["line"]]
    kept = [int(x) for b in batches for x in b.frame["source_line"]]
    return rejects, kept


def test_ranges_renumbered_equal_one_pass() -> None:
    path = FIXTURES / "shop" / "postings.jsonl"
    whole = parse_json_lines_range(path, "postings")[0]
    shifted = []
    offset = 0
    for start, stop in split_at_line_starts(path, 4):
        batches, lines_read = parse_json_lines_range(path, "postings", start, stop)
        shifted += [shift_lines(batch, offset) for batch in batches]
        offset += lines_read
    assert _lines_of(shifted) == _lines_of(whole)


def test_worker_processes_give_the_same_tables(tmp_path: Path) -> None:
    path = tmp_path / "postings.jsonl"
    shutil.copy(FIXTURES / "shop" / "postings.jsonl", path)
    one = build_history_tables(load_json_lines_batches(path, "postings", workers=1))
    two = build_history_tables(
        load_json_lines_batches(path, "postings", workers=2, parallel_min_bytes=0)
    )
    pd.testing.assert_frame_equal(one.postings, two.postings)
    pd.testing.assert_frame_equal(one.items, two.items)
    pd.testing.assert_frame_equal(one.rejects, two.rejects)
    assert one.report == two.report
