"""Read a seller's history directory (see data/CONTRACT.md) into the normalised tables.

``load_*`` functions here touch the file system; all parsing is delegated to the pure
``build_*`` functions of the sibling modules, which the REST service reuses on objects.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from core.errors import HistoryError
from core.ingest.assemble import build_history_tables
from core.ingest.batches import Parsed, PostingBatch, build_rejects
from core.ingest.cabinet import build_cabinet_posting_batch
from core.ingest.events import (
    PRICE_COLUMNS,
    SCAN_COLUMNS,
    build_price_events,
    build_scan_events,
)
from core.ingest.jsonlines import (
    BOM,
    MAX_LINE_BYTES,
    JsonLinesLoads,
    load_json_lines_batches,
    overlong_line_reason,
    paused_garbage_collector,
)
from core.ingest.postings import build_api_posting_batch
from core.tables import HistoryTables

logger = logging.getLogger(__name__)

POSTINGS_JSONL = "postings.jsonl"
POSTINGS_JSON_GLOB = "postings*.json"
ORDERS_CSV = "orders.csv"
PUSHES_JSONL = "pushes.jsonl"
PRICES_CSV = "prices.csv"
TRACKING_CSV = "tracking.csv"
PRODUCTS_JSONL = "products.jsonl"
OPTIONAL_FILES = (PUSHES_JSONL, PRICES_CSV, TRACKING_CSV, PRODUCTS_JSONL)

PRICE_REQUIRED = ("offer_id", "at", "price")
SCAN_REQUIRED = ("posting_number", "at", "status")

# A saved reply holds at most one page of postings (1,000): a few megabytes. A larger file is not
# one reply, and is read whole (not line by line), so it is refused before it is read.
MAX_REPLY_BYTES = 4 * MAX_LINE_BYTES
# CSV is parsed in blocks that must each hold whole rows; rows up to MAX_LINE_BYTES fit.
CSV_BLOCK_BYTES = 2 * MAX_LINE_BYTES
_NEWLINE_SCAN_BYTES = 64 * 2**20
_EMPTY_SCAN_BYTES = 2**16


def load_posting_lines(path: Path, loads: JsonLinesLoads | None = None) -> list[PostingBatch]:
    """postings.jsonl: one Seller API posting object per line."""
    return cast(list[PostingBatch], load_json_lines_batches(path, "postings", loads=loads))


def build_reply_postings(document: Any) -> tuple[list[Any], str | None] | str:
    """The posting list inside a saved API reply, and the scheme its shape implies.

    Accepts the FBS list v3 ``{"result": {"postings": [...]}}``, the FBS list v4
    ``{"postings": [...]}`` (also wrapped in ``result``), a get reply ``{"result": {posting}}``,
    the FBO list v2 ``{"result": [...]}``, a plain array, or one bare posting. Returns a reason
    string when the document is none of these.
    """
    if type(document) is list:
        return document, None
    if type(document) is not dict:
        return "reply is neither an object nor an array"
    result = document.get("result", document)
    if type(result) is list:
        return result, "fbo" if "postings" not in document else None
    if type(result) is dict:
        if type(result.get("postings")) is list:
            return result["postings"], None
        if "posting_number" in result:
            return [result], None
    keys = ", ".join(sorted(document)[:5]) or "none"
    return f"reply holds no postings (top-level keys: {keys})"


def load_posting_reply(path: Path) -> PostingBatch:
    """postings*.json: one saved API reply; rejects name the posting's index in its list."""
    size = path.stat().st_size
    if size > MAX_REPLY_BYTES:
        return _unreadable_reply(
            path.name,
            f"file is {size:,} bytes, more than the {MAX_REPLY_BYTES // 2**20} MiB "
            "a saved reply may take: not read",
        )
    try:
        document = orjson.loads(path.read_bytes().removeprefix(BOM))
    except orjson.JSONDecodeError as exc:
        return _unreadable_reply(path.name, f"file is not valid JSON ({exc.msg})")
    found = build_reply_postings(document)
    if isinstance(found, str):
        return _unreadable_reply(path.name, found)
    postings, scheme = found
    return build_api_posting_batch(
        postings, range(1, len(postings) + 1), path.name, numbered=True, scheme=scheme
    )


def _unreadable_reply(file: str, reason: str) -> PostingBatch:
    """A reply file that yields no postings counts as one record read and rejected."""
    empty = build_api_posting_batch([], [], file)
    empty.rejects = build_rejects(file, [1], [reason])
    empty.records_read = 1
    return empty


@dataclass
class CsvText:
    """A CSV file's cells as text (``""`` when empty), with each row's line and problems."""

    frame: pd.DataFrame
    lines: np.ndarray  # 1-based physical line of each row (the header is line 1)
    problems: np.ndarray  # per row: why its fields cannot be trusted, or None
    warnings: list[str]


def is_empty_file(path: Path) -> bool:
    """True when a file holds nothing but whitespace (and perhaps a byte-order mark).

    Reads only up to the first byte that is not whitespace: the start of any real file.
    """
    with path.open("rb") as handle:
        block = handle.read(_EMPTY_SCAN_BYTES).removeprefix(BOM)
        while block:
            if block.strip():
                return False
            block = handle.read(_EMPTY_SCAN_BYTES)
    return True


def _line_ends(raw: bytes) -> np.ndarray:
    """Offsets of every newline in ``raw``, then ``len(raw)``; scanned in bounded slices."""
    view = np.frombuffer(raw, dtype=np.uint8)
    found = [
        np.flatnonzero(view[start : start + _NEWLINE_SCAN_BYTES] == ord("\n")) + start
        for start in range(0, len(view), _NEWLINE_SCAN_BYTES)
    ]
    return np.concatenate([*found, np.asarray([len(raw)], dtype=np.int64)])


def cut_overlong_lines(raw: bytes, file: str) -> tuple[bytes, dict[int, int]]:
    """Empty every line longer than ``MAX_LINE_BYTES``, keeping its newline.

    Returns the text and, by 1-based physical line, the length of each line emptied, so the
    reader can reject those rows with their lines while the rest of the file parses (a row
    larger than a parsing block would otherwise stop the whole file).
    """
    if len(raw) <= MAX_LINE_BYTES:
        return raw, {}
    ends = _line_ends(raw)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts
    overlong = np.flatnonzero(lengths > MAX_LINE_BYTES)
    if not len(overlong):
        return raw, {}
    if overlong[0] == 0:
        raise HistoryError(
            f"{file}: the header line is {int(lengths[0]):,} bytes long; this is not a CSV "
            "export this tool can read"
        )
    pieces, kept_from = [], 0
    for k in overlong:
        pieces.append(raw[kept_from : starts[k]])
        kept_from = int(ends[k])
    pieces.append(raw[kept_from:])
    return b"".join(pieces), {int(k) + 1: int(lengths[k]) for k in overlong}


def csv_separator(header_line: str) -> str:
    """The separator a CSV file uses: whichever of ``;`` ``,`` tab its header holds most."""
    return max((";", ",", "\t"), key=header_line.count)


def load_csv_text(path: Path) -> CsvText:
    """Read a CSV for the column builders.

    UTF-8 with or without BOM (cp1251 as a fallback, with a warning); the separator is
    whichever of ``;`` ``,`` tab the header uses most; cells are trimmed; blank rows are
    dropped. A row with more or fewer fields than the header has shifted or lost values, so
    it is kept as a row marked with that problem (its builder rejects it) rather than
    guessed at; so is a line longer than ``MAX_LINE_BYTES``, which is not parsed at all. Line
    numbers are physical lines, the header being line 1.
    """
    raw, overlong = cut_overlong_lines(path.read_bytes().removeprefix(BOM), path.name)
    warnings: list[str] = []
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raw = raw.decode("cp1251", errors="replace").encode("utf-8")
        warnings.append(f"{path.name} is not UTF-8; read as cp1251")
    first_line = raw.split(b"\n", 1)[0].decode("utf-8").rstrip("\r")
    if not first_line.strip():
        raise HistoryError(f"{path.name} is empty: it has no header row")
    separator = csv_separator(first_line)
    header = next(csv.reader([first_line], delimiter=separator))
    broken: list[tuple[int, int, str]] = []

    def keep_broken(row: pacsv.InvalidRow) -> str:
        broken.append((row.number, row.actual_columns, row.text))
        return "skip"

    try:
        table = pacsv.read_csv(
            io.BytesIO(raw),
            # Serial reading is what gives each broken row its physical line number.
            read_options=pacsv.ReadOptions(
                use_threads=False,
                column_names=header,
                skip_rows=1,
                block_size=CSV_BLOCK_BYTES,
            ),
            parse_options=pacsv.ParseOptions(
                delimiter=separator, invalid_row_handler=keep_broken, ignore_empty_lines=False
            ),
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(header, pa.string()),
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as exc:
        raise HistoryError(f"{path.name} cannot be read as CSV: {exc}") from None
    frame = pd.DataFrame(
        {
            name: pd.array(pc.utf8_trim_whitespace(table.column(i)), dtype="string")
            for i, name in enumerate(header)
        }
    )
    broken_lines = {number for number, _, _ in broken}
    all_lines = np.arange(2, 2 + len(frame) + len(broken), dtype=np.int64)
    lines = all_lines[~np.isin(all_lines, list(broken_lines))]
    problems = np.full(len(frame), None, dtype=object)
    if broken:
        frame, lines, problems = _with_broken_rows(
            frame, lines, problems, broken, separator, header
        )
    for line, length in overlong.items():
        problems[lines == line] = overlong_line_reason(length)
    frame.columns = [name.strip() for name in header]
    blank = (frame == "").all(axis=1).to_numpy() & pd.isna(problems)
    return CsvText(frame[~blank].reset_index(drop=True), lines[~blank], problems[~blank], warnings)


def _with_broken_rows(
    frame: pd.DataFrame,
    lines: np.ndarray,
    problems: np.ndarray,
    broken: list[tuple[int, int, str]],
    separator: str,
    header: list[str],
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Add the rows with a wrong field count back, in line order, each with its problem."""
    width = len(header)
    fitted = [
        [field.strip() for field in (fields + [""] * width)[:width]]
        for fields in (next(csv.reader([text], delimiter=separator), []) for _, _, text in broken)
    ]
    extra = pd.DataFrame(fitted, columns=frame.columns).astype("string")
    reasons = [
        f"row has {actual} field{'' if actual == 1 else 's'}, the header has {width}"
        for _, actual, _ in broken
    ]
    merged = pd.concat([frame, extra], ignore_index=True)
    merged_lines = np.concatenate([lines, [number for number, _, _ in broken]])
    merged_problems = np.concatenate([problems, np.asarray(reasons, dtype=object)])
    order = np.argsort(merged_lines, kind="stable")
    return merged.iloc[order].reset_index(drop=True), merged_lines[order], merged_problems[order]


def _side_csv_columns(
    path: Path, names: tuple[str, ...], required: tuple[str, ...]
) -> tuple[dict[str, pd.Series], CsvText]:
    """Columns of prices.csv / tracking.csv by lower-cased header; stop if one is missing."""
    csv_text = load_csv_text(path)
    frame = csv_text.frame
    frame.columns = [c.lower() for c in frame.columns]
    for name in required:
        if name not in frame.columns:
            raise HistoryError(f"{path.name}: required column '{name}' is missing")
    return {name: frame[name] for name in names if name in frame.columns}, csv_text


def load_orders_csv(path: Path, *, cancellations_are_buyer: bool) -> tuple[PostingBatch, list[str]]:
    """orders.csv, the seller-cabinet export; also warnings (encoding, unknown status texts)."""
    csv_text = load_csv_text(path)
    warnings = csv_text.warnings
    batch, unknown = build_cabinet_posting_batch(
        csv_text.frame,
        csv_text.lines,
        path.name,
        cancellations_are_buyer=cancellations_are_buyer,
        row_problems=csv_text.problems,
    )
    if unknown:
        texts = ", ".join(f"{text!r} ({count})" for text, count in sorted(unknown.items()))
        warnings.append(f"{path.name}: status texts kept as written (treated as open): {texts}")
    return batch, warnings


def load_pushes(path: Path, loads: JsonLinesLoads | None = None) -> list[Parsed]:
    """pushes.jsonl: the webhook archive, one notification per line."""
    return load_json_lines_batches(path, "pushes", loads=loads)


def load_products(path: Path) -> list[Parsed]:
    """products.jsonl: one product card per line."""
    return load_json_lines_batches(path, "products")


def load_prices(path: Path) -> tuple[Parsed, list[str]]:
    """prices.csv: the seller's price log."""
    columns, csv_text = _side_csv_columns(path, PRICE_COLUMNS, PRICE_REQUIRED)
    parsed = build_price_events(columns, csv_text.lines, path.name, row_problems=csv_text.problems)
    return parsed, csv_text.warnings


def load_tracking(path: Path) -> tuple[Parsed, list[str]]:
    """tracking.csv: carrier scans."""
    columns, csv_text = _side_csv_columns(path, SCAN_COLUMNS, SCAN_REQUIRED)
    parsed = build_scan_events(columns, csv_text.lines, path.name, row_problems=csv_text.problems)
    return parsed, csv_text.warnings


def find_posting_files(root: Path) -> list[Path]:
    """The posting sources in reading order: orders.csv, postings*.json by name, postings.jsonl.

    Later sources win ties between duplicates, so the API files (richer than the cabinet
    export) come last.
    """
    sources = [root / ORDERS_CSV] if (root / ORDERS_CSV).is_file() else []
    sources += sorted(p for p in root.glob(POSTINGS_JSON_GLOB) if p.is_file())
    if (root / POSTINGS_JSONL).is_file():
        sources.append(root / POSTINGS_JSONL)
    return sources


def load_posting_sources(
    sources: list[Path], *, csv_cancellations_are_buyer: bool
) -> tuple[list[PostingBatch], list[str]]:
    """Parse every posting file, in reading order; also the warnings they raised."""
    batches: list[PostingBatch] = []
    warnings: list[str] = []
    for source in sources:
        logger.info("reading %s", source)
        if source.name == ORDERS_CSV:
            batch, csv_warnings = load_orders_csv(
                source, cancellations_are_buyer=csv_cancellations_are_buyer
            )
            batches.append(batch)
            warnings += csv_warnings
        elif source.name == POSTINGS_JSONL:
            batches += load_posting_lines(source)
        else:
            batches.append(load_posting_reply(source))
    return batches, warnings


def load_optional_sources(
    root: Path, loads: JsonLinesLoads | None = None
) -> tuple[list[Parsed], list[Parsed], list[str], list[str]]:
    """Parse the optional files that exist: event batches, product batches, the missing
    file names and warnings.

    The pushes come first among the events; with ``loads`` they are collected last, so the
    CSV files are read while the workers are still parsing the pushes.
    """
    pushes: Path | None = None
    events: list[Parsed] = []
    products: list[Parsed] = []
    missing: list[str] = []
    warnings: list[str] = []
    for name in OPTIONAL_FILES:
        file = root / name
        if not file.is_file():
            missing.append(name)
            continue
        if is_empty_file(file):
            warnings.append(empty_file_warning(name))
            continue
        logger.info("reading %s", file)
        if name == PUSHES_JSONL:
            pushes = file
        elif name == PRODUCTS_JSONL:
            products += load_products(file)
        else:
            loader = load_prices if name == PRICES_CSV else load_tracking
            parsed, csv_warnings = loader(file)
            events.append(parsed)
            warnings += csv_warnings
    if pushes is not None:
        events = [*load_pushes(pushes, loads), *events]
    return events, products, missing, warnings


def empty_file_warning(name: str) -> str:
    return f"{name} is empty: it holds no records"


def find_nonempty_posting_files(root: Path) -> tuple[list[Path], list[str]]:
    """The posting sources to read, and a warning for each empty one.

    An empty file (a failed download, a poller that created it and died) holds no records: next
    to sources that do hold postings it is skipped with a warning. When every source is empty
    they are read as they are: JSON files yield no postings, and an empty orders.csv, which
    has no header, stops the load.
    """
    sources = find_posting_files(root)
    if not sources:
        raise HistoryError(
            f"no postings in {root}: expected {POSTINGS_JSONL}, "
            f"{POSTINGS_JSON_GLOB} or {ORDERS_CSV}"
        )
    empty = [source for source in sources if is_empty_file(source)]
    warnings = [empty_file_warning(source.name) for source in empty]
    if len(empty) == len(sources):
        return sources, warnings
    return [source for source in sources if source not in empty], warnings


def load_history(path: str | Path, *, csv_cancellations_are_buyer: bool = False) -> HistoryTables:
    """Load a history directory into the normalised tables.

    Raises ``HistoryError`` when the directory is missing, holds no postings file, or a CSV
    lacks a required column (an empty CSV has none). Everything else that cannot be used becomes
    a reject or a warning in the report. ``csv_cancellations_are_buyer`` declares every
    cancelled row of orders.csv (which names no initiator) a buyer cancellation. Files not in
    the contract (a simulator's truth.csv, notes) are ignored.
    """
    root = Path(path)
    if not root.is_dir():
        raise HistoryError(f"history directory {root} does not exist")
    sources, empty_warnings = find_nonempty_posting_files(root)
    # The large JSON Lines files go to worker processes first; this process reads the other
    # files meanwhile and collects postings.jsonl (always the last posting source, and never
    # a reason to stop the load) once everything else has been read.
    lines_file = root / POSTINGS_JSONL if root / POSTINGS_JSONL in sources else None
    pushes_file = root / PUSHES_JSONL
    with paused_garbage_collector(), JsonLinesLoads() as loads:
        if lines_file is not None:
            loads.start(lines_file, "postings")
        if pushes_file.is_file() and not is_empty_file(pushes_file):
            loads.start(pushes_file, "pushes")
        posting_batches, posting_warnings = load_posting_sources(
            [source for source in sources if source != lines_file],
            csv_cancellations_are_buyer=csv_cancellations_are_buyer,
        )
        events, products, missing, side_warnings = load_optional_sources(root, loads)
        if lines_file is not None:
            logger.info("reading %s", lines_file)
            posting_batches += load_posting_lines(lines_file, loads)
        tables = build_history_tables(
            posting_batches,
            events,
            products,
            missing_optional=missing,
            warnings=[*empty_warnings, *posting_warnings, *side_warnings],
        )
    report = tables.report
    for name in report.missing_optional:
        logger.warning("optional %s is missing: its features will be empty", name)
    logger.info(
        "postings: %d read, %d kept, %d rejected, %d duplicates merged",
        report.postings_read,
        report.postings_kept,
        report.postings_rejected,
        report.duplicates_merged,
    )
    return tables
