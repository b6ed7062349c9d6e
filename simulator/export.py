"""Writing a simulated shop as a seller's history directory, in the data contract's format.

Only what the seller's archive would hold at the export moment is written: the postings as the
Seller API returns them then, the pushes received until then, the price log, the carrier scans
and the product cards. ``truth.csv`` and ``truth_causes.csv`` (optional) are the files a real
archive never has: the true probability of each posting open at the export moment with its
outcome, and each cause's contribution to that probability (:mod:`simulator.causes`). The
postings and pushes are written as :mod:`simulator.seller_api` gives them, or the postings as
the seller cabinet's CSV export (:mod:`simulator.cabinet_csv`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pandas as pd

from simulator.cabinet_csv import write_cabinet_csv
from simulator.causes import contribution_columns
from simulator.parameters import BUYER_CANCELLED, DELIVERED, OUTCOME_NAMES
from simulator.seller_api import hour_stamps, iso_time, posting_objects, push_rows
from simulator.shop import SimulatedWorld

TRUTH_CAUSES_FILE = "truth_causes.csv"
SCAN_TEXTS = (
    "已揽收 Accepted by carrier",
    "Прибыло в сортировочный центр",
    "离开分拣中心 Departed sorting center",
    "Transit: border crossing",
    "Выпущено таможней",
    "运输中 In transit",
)
SCAN_PLACES = (
    "义乌 Yiwu",
    "乌鲁木齐 Urumqi",
    "Забайкальск",
    "Новосибирск",
    "Москва",
    "Екатеринбург",
)


def _price_rows(world: SimulatedWorld) -> pd.DataFrame:
    cat = world.catalogue
    start_rows = (
        np.arange(cat.offer_id.size),
        np.full(cat.offer_id.size, -24.0),
        cat.base_price,
        np.full(cat.offer_id.size, np.nan),
    )
    parts = [start_rows, *world.recorder.prices, *world.observed_prices]
    offer, at, price, old = (np.concatenate([part[k] for part in parts]) for k in range(4))
    frame = pd.DataFrame(
        {
            "hour": at,
            "offer_id": cat.offer_id[offer],
            "at": [iso_time(s) for s in hour_stamps(world, at)],
            "price": np.round(price, 2),
            "old_price": np.round(old, 2),
            "currency_code": world.config.currency,
        }
    )
    frame = frame[frame["hour"] <= world.export_h].sort_values(["hour", "offer_id"], kind="stable")
    return frame.drop(columns="hour")


def _tracking_rows(world: SimulatedWorld) -> pd.DataFrame:
    rng = np.random.default_rng([world.config.seed, 3])
    idx = np.concatenate([s[0] for s in world.recorder.scans] or [np.array([], dtype=int)])
    at = np.concatenate([s[1] for s in world.recorder.scans] or [np.array([])])
    frame = pd.DataFrame(
        {
            "hour": at,
            "posting_number": world.orders.posting_number[idx],
            "at": [iso_time(s) for s in hour_stamps(world, at)],
            "status": np.array(SCAN_TEXTS, dtype=object)[
                rng.integers(0, len(SCAN_TEXTS), idx.size)
            ],
            "location": np.array(SCAN_PLACES, dtype=object)[
                rng.integers(0, len(SCAN_PLACES), idx.size)
            ],
        }
    )
    return frame.sort_values(["hour", "posting_number"], kind="stable").drop(columns="hour")


def _product_objects(world: SimulatedWorld) -> list[dict]:
    cat = world.catalogue
    last_edit = np.full(cat.offer_id.size, -24.0 * 30)
    for idx, at in world.recorder.card_edits:
        np.maximum.at(last_edit, idx, at)
    created = hour_stamps(world, np.full(cat.offer_id.size, -24.0 * 60))
    updated = hour_stamps(world, last_edit)
    return [
        {
            "offer_id": cat.offer_id[k],
            "sku": int(cat.sku[k]),
            "name": cat.name[k],
            "description_category_id": int(cat.category_id[k]),
            "type_id": 90_000 + int(cat.category_id[k]) % 100,
            "created_at": iso_time(created[k]),
            "updated_at": iso_time(updated[k]),
        }
        for k in range(cat.offer_id.size)
    ]


def _truth_frame(world: SimulatedWorld) -> pd.DataFrame:
    truth = world.truth
    index = truth["posting"].to_numpy()
    outcome = world.final.outcome[index]
    closed = world.final.closed_h[index]
    label = np.where(outcome == BUYER_CANCELLED, "1", np.where(outcome == DELIVERED, "0", ""))
    return pd.DataFrame(
        {
            "posting_number": world.orders.posting_number[index],
            "as_of": iso_time(world.timestamp(np.array([world.export_h]))[0]),
            "true_probability": np.round(truth["true_probability"].to_numpy(), 6),
            "outcome": [OUTCOME_NAMES[int(k)] for k in outcome],
            "outcome_at": [iso_time(s) for s in hour_stamps(world, closed)],
            "label": label,
        }
    )


def _truth_causes_frame(world: SimulatedWorld) -> pd.DataFrame:
    causes = world.truth_causes
    index = causes["posting"].to_numpy()
    frame = pd.DataFrame({"posting_number": world.orders.posting_number[index]})
    for column in ("true_probability", *contribution_columns()):
        # + 0.0: a contribution rounded to -0.0 is written as 0.0
        frame[column] = np.round(causes[column].to_numpy(), 6) + 0.0
    frame["dominant_cause"] = causes["dominant_cause"].to_numpy()
    return frame


def _write_jsonl(path: Path, objects) -> None:
    with path.open("wb") as handle:
        for obj in objects:
            handle.write(orjson.dumps(obj))
            handle.write(b"\n")


def write_history(
    world: SimulatedWorld, out: Path | str, *, posting_format: str = "jsonl", truth: bool = False
) -> list[Path]:
    """Write the shop's history directory (and ``truth.csv``, with ``truth_causes.csv`` when
    the world was simulated with its causes); returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    objects = posting_objects(world)
    written = []
    if posting_format == "jsonl":
        written.append(out / "postings.jsonl")
        _write_jsonl(written[-1], objects)
    elif posting_format == "csv":
        written.append(out / "orders.csv")
        write_cabinet_csv(world, objects, written[-1])
    else:
        raise ValueError(f"posting_format must be 'jsonl' or 'csv', not {posting_format!r}")
    written.append(out / "pushes.jsonl")
    _write_jsonl(written[-1], (push for _, push in push_rows(world, objects)))
    written.append(out / "prices.csv")
    _price_rows(world).to_csv(written[-1], index=False)
    written.append(out / "tracking.csv")
    _tracking_rows(world).to_csv(written[-1], index=False)
    written.append(out / "products.jsonl")
    _write_jsonl(written[-1], _product_objects(world))
    if truth:
        if world.truth is None:
            raise ValueError("the world was simulated without truth=True")
        written.append(out / "truth.csv")
        _truth_frame(world).to_csv(written[-1], index=False)
        if world.truth_causes is not None:
            written.append(out / TRUTH_CAUSES_FILE)
            _truth_causes_frame(world).to_csv(written[-1], index=False)
    return written
