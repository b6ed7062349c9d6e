"""Reasons, actions and decisions: the top reason names the cause that was planted in an order."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from core.costs import CostsConfig
from core.counterfactuals import CAUSES, build_reference_values, build_risk_drops
from core.explain import build_decisions, build_explanations
from core.features import build_features
from core.playbook import LANGUAGES, NO_SINGLE_CAUSE, format_rows, load_playbook, percent_text
from core.tables import EVENT_COLUMNS, HistoryTables, conform

HOUR = pd.Timedelta(hours=1)
DAY = pd.Timedelta(days=1)


@pytest.fixture(scope="module")
def shop(trained_shop):
    return trained_shop.tables, trained_shop.model, trained_shop.as_of


def _calm_posting(tables: HistoryTables, model, as_of) -> str:
    """An open, handed-over posting with nothing wrong: recent scan, no price or card change."""
    features = build_features(tables, as_of, aggregates=model.aggregates)
    reference = model.metadata["reference_values"]
    calm = features[
        (features["is_handed_over"] == 1)
        & (features["hours_since_last_activity"] < 24)
        & (features["price_change_pct"].fillna(0) >= 0)
        & (features["card_edits_since_purchase"].fillna(0) == 0)
        & (features["hours_to_promised_delivery_end"] > 96)
        & (features["hours_since_order"] > 72)
        & (features["product_lines"] == 1)
        & (features["carrier"] == reference["carrier"])
        & (features["payment_type"] == reference["payment_type"])
        & (features["buyer_earlier_buyer_cancels"] == 0)
    ]
    assert len(calm) > 0
    # The youngest: the longest exposure ahead, so a planted cause moves its risk the most.
    return str(calm.sort_values(["hours_since_order"], kind="stable").index[0])


def _with_events(tables: HistoryTables, rows: list[dict]) -> HistoryTables:
    added = conform(pd.DataFrame(rows), EVENT_COLUMNS)
    return replace(tables, events=pd.concat([tables.events, added], ignore_index=True))


def _offer_of(tables: HistoryTables, posting: str) -> tuple[str, float]:
    item = tables.items[tables.items["posting_number"] == posting].iloc[0]
    return str(item["offer_id"]), float(item["unit_price"])


def _top_reason(tables: HistoryTables, model, as_of, posting: str):
    features = build_features(tables, as_of, aggregates=model.aggregates).loc[[posting]]
    probabilities = model.score_features(features)
    explanation = build_explanations(model, features, probabilities)[0]
    assert explanation.reasons, "a planted cause must give a reason"
    return explanation, probabilities[0]


def test_a_large_price_drop_is_the_top_reason(shop):
    tables, model, as_of = shop
    posting = _calm_posting(tables, model, as_of)
    offer, paid = _offer_of(tables, posting)
    # The seller cut the price two hours ago and it stays cut: the shop's daily price rows of
    # this offer since then are dropped, or the one at as_of would restore it.
    events = tables.events
    later_rows = events["kind"].eq("price") & events["offer_id"].eq(offer)
    later_rows &= events["at"] > as_of - 2 * HOUR
    tables = replace(tables, events=events[~later_rows.to_numpy(dtype=bool, na_value=False)])
    tables = _with_events(
        tables,
        [{"at": as_of - 2 * HOUR, "kind": "price", "offer_id": offer, "price": paid * 0.6}],
    )
    explanation, _ = _top_reason(tables, model, as_of, posting)
    assert explanation.reasons[0].code == "price_drop"
    assert "-40 %" in explanation.reasons[0].facts


def _handed_over_and_silent(
    tables: HistoryTables, posting: str, as_of: pd.Timestamp, days: int
) -> HistoryTables:
    """The posting handed over ``days`` ago, on time, with no tracking since the handover."""
    handed = as_of - days * DAY
    postings = tables.postings.copy()
    row = postings["posting_number"] == posting
    postings.loc[row, "ordered_at"] = handed - 2 * DAY
    postings.loc[row, "shipment_deadline_at"] = handed + DAY
    postings.loc[row, "handed_over_at"] = handed
    postings.loc[row, "promised_delivery_end_at"] = as_of + 6 * DAY
    events = tables.events
    own = events["posting_number"] == posting
    quiet = own & events["kind"].isin(["carrier_scan", "state_change", "delivery_date_change"])
    events = events[~quiet | (events["at"] <= handed + HOUR)]
    return replace(tables, postings=postings, events=events)


def test_two_weeks_without_a_scan_is_the_top_reason(shop):
    tables, model, as_of = shop
    posting = _calm_posting(tables, model, as_of)
    tables = _handed_over_and_silent(tables, posting, as_of, days=16)
    explanation, _ = _top_reason(tables, model, as_of, posting)
    assert explanation.reasons[0].code == "tracking_quiet"
    assert explanation.reasons[0].values["quiet_days"] >= 16
    assert "days without a scan" in explanation.reasons[0].facts


def test_a_parcel_stuck_for_days_and_moving_again_is_named_by_its_silence(shop):
    tables, model, as_of = shop
    posting = _calm_posting(tables, model, as_of)
    tables = _handed_over_and_silent(tables, posting, as_of, days=12)
    # Ten days without a scan after the handover, then scans again in the last day.
    scans = [
        {"at": as_of - k * HOUR, "kind": "carrier_scan", "posting_number": posting, "state": "x"}
        for k in (20, 6)
    ]
    tables = _with_events(tables, scans)
    features = build_features(tables, as_of, aggregates=model.aggregates).loc[[posting]]
    assert features["hours_since_last_activity"].iloc[0] == 6.0
    assert features["silent_hours_since_handover"].iloc[0] > 7 * 24
    explanation, _ = _top_reason(tables, model, as_of, posting)
    quiet = [reason for reason in explanation.reasons if reason.code == "tracking_quiet"]
    assert quiet, explanation.reasons
    assert "without tracking updates since the handover" in quiet[0].facts
    assert quiet[0].values["silent_days"] > 7


def test_a_card_edit_after_purchase_is_the_top_reason(shop):
    tables, model, as_of = shop
    posting = _calm_posting(tables, model, as_of)
    offer, _ = _offer_of(tables, posting)
    edits = [{"at": as_of - k * HOUR, "kind": "card_edit", "offer_id": offer} for k in (3, 20, 30)]
    tables = _with_events(tables, edits)
    explanation, _ = _top_reason(tables, model, as_of, posting)
    assert explanation.reasons[0].code == "listing_changed"
    assert "card edited since purchase (3×)" in explanation.reasons[0].facts


def test_an_order_not_shipped_for_a_week_is_the_top_reason(shop):
    tables, model, as_of = shop
    posting = _calm_posting(tables, model, as_of)
    postings = tables.postings.copy()
    row = postings["posting_number"] == posting
    postings.loc[row, "ordered_at"] = as_of - 6 * DAY
    postings.loc[row, "shipment_deadline_at"] = as_of - 2 * DAY
    postings.loc[row, "handed_over_at"] = pd.NaT
    postings.loc[row, "promised_delivery_end_at"] = as_of + 14 * DAY
    events = tables.events
    own = (events["posting_number"] == posting) & events["kind"].isin(
        ["carrier_scan", "state_change", "delivery_date_change"]
    )
    tables = replace(tables, postings=postings, events=events[~own])
    explanation, _ = _top_reason(tables, model, as_of, posting)
    assert explanation.reasons[0].code == "not_shipped"
    assert "not handed over 6.0 days after the order" in explanation.reasons[0].facts


def test_reasons_are_at_most_three_raise_the_risk_and_follow_the_language(shop):
    tables, model, as_of = shop
    features = build_features(tables, as_of, aggregates=model.aggregates)
    probabilities = model.score_features(features)
    for lang in LANGUAGES:
        explanations = build_explanations(model, features, probabilities, lang=lang)
        assert len(explanations) == len(features)
        playbook = load_playbook()
        titles = {
            a.get(lang) for c in (*CAUSES, NO_SINGLE_CAUSE) for a in playbook.entry(c).actions
        }
        levels = model.risk_levels(probabilities)
        for explanation, level in zip(explanations, levels, strict=True):
            assert len(explanation.reasons) <= 3
            codes = [r.code for r in explanation.reasons]
            if codes == [NO_SINGLE_CAUSE]:
                assert level != "low"
                assert explanation.reasons[0].risk_drop == explanation.reasons[0].share == 0.0
            else:
                assert all(r.risk_drop > 0 and r.code in CAUSES for r in explanation.reasons)
            assert explanation.reasons or level == "low"
            drops = [r.risk_drop for r in explanation.reasons]
            assert drops == sorted(drops, reverse=True)
            if explanation.reasons:
                assert set(explanation.actions) & titles
            assert len(explanation.actions) <= 4
            if explanation.decision != "ship":
                decision_text = playbook.decisions[explanation.decision].get(lang)
                assert explanation.actions[0] == decision_text
    chinese = build_explanations(model, features, probabilities, lang="zh")
    assert any("\u4e00" <= ch <= "\u9fff" for e in chinese for r in e.reasons for ch in r.facts)


def test_risk_drops_only_for_causes_that_apply(shop):
    tables, model, as_of = shop
    features = build_features(tables, as_of, aggregates=model.aggregates)
    drops = build_risk_drops(model, features)
    not_edited = features["card_edits_since_purchase"].fillna(0) == 0
    assert drops.loc[not_edited, "listing_changed"].isna().all()
    handed = features["is_handed_over"] == 1
    assert drops.loc[handed, "not_shipped"].isna().all()


def test_decisions_follow_expected_cost():
    costs = CostsConfig(
        cancelled_order_cost=400,
        contact_cost=10,
        contact_effect=0.25,
        hold_cost=40,
        hold_effect=0.5,
    )
    p = np.array([0.05, 0.2, 0.5, 0.5])
    handed = np.array([0, 0, 0, 1])
    decisions, savings = build_decisions(p, handed, costs)
    assert decisions.tolist() == ["ship", "contact_buyer", "hold_and_confirm", "contact_buyer"]
    assert savings.tolist() == pytest.approx([0.0, 10.0, 60.0, 40.0])


def test_the_playbook_is_editable_data(tmp_path):
    text = (load_playbook.__globals__["resources"].files("core") / "playbook.yaml").read_text(
        encoding="utf-8"
    )
    edited = text.replace("Ship today", "Ship before 18:00 today")
    path = tmp_path / "playbook.yaml"
    path.write_text(edited, encoding="utf-8")
    playbook = load_playbook(path)
    assert playbook.causes["not_shipped"].actions[0].en == "Ship before 18:00 today"
    path.write_text(text.replace("        zh: 今天发货\n", ""), encoding="utf-8")
    with pytest.raises(ValueError, match="zh"):
        load_playbook(path)


def test_an_order_at_risk_that_no_single_cause_explains_gets_that_as_its_reason(shop):
    tables, model, as_of = shop
    features = build_features(tables, as_of, aggregates=model.aggregates)
    probabilities = model.score_features(features)
    levels = model.risk_levels(probabilities)
    drops = build_risk_drops(model, features, probabilities)
    explanations = build_explanations(model, features, probabilities)
    # Orders whose every applicable cause removes less than the named minimum.
    unexplained = (drops.fillna(-1).max(axis=1) < 0.002).to_numpy()
    at_risk = levels != "low"
    assert (unexplained & at_risk).any() and (unexplained & ~at_risk).any()
    for row in np.flatnonzero(unexplained):
        reasons = explanations[row].reasons
        if at_risk[row]:
            (reason,) = reasons
            assert reason.code == NO_SINGLE_CAUSE
            assert "no single fix lowers it" in reason.facts
            assert f"carrier {features['carrier'].iloc[row]}" in reason.facts
            playbook = load_playbook()
            assert playbook.entry(NO_SINGLE_CAUSE).actions[0].en in explanations[row].actions
        else:
            assert reasons == ()


def test_fact_templates_are_filled_as_format_map_fills_them():
    columns = {
        "days": [1.25, float("nan"), -0.0, 12.5],
        "carrier": ["Почта", "?", "cainiao", "{x}"],
    }
    templates = [
        "{days:.0f} days via {carrier}",
        "{carrier!r} {days!s}: {{literal}} {days:+.1f}",
        "{days:>{width}}",  # a nested field: formatted row by row, as format_map does it
        "no fields at all",
        "",
    ]
    rows = [3, 0, 2, 1, 0]
    for template in templates:
        expected = []
        for row in rows:
            values = {name: column[row] for name, column in columns.items()}
            try:
                expected.append(template.format_map(values))
            except KeyError as exc:
                expected.append(exc)
        if any(isinstance(e, KeyError) for e in expected):
            with pytest.raises(KeyError):
                format_rows(template, columns, rows)
        else:
            assert format_rows(template, columns, rows) == expected
    with pytest.raises(KeyError, match="unknown"):
        format_rows("{unknown:.0f}", columns, rows)


def test_a_playbook_written_before_no_single_cause_uses_the_shipped_entry(tmp_path):
    text = (load_playbook.__globals__["resources"].files("core") / "playbook.yaml").read_text(
        encoding="utf-8"
    )
    start, end = text.index("no_single_cause:"), text.index("\ndecisions:")
    path = tmp_path / "playbook.yaml"
    path.write_text(text[:start] + text[end:], encoding="utf-8")
    older = load_playbook(path)
    assert older.no_single_cause is None
    assert older.entry(NO_SINGLE_CAUSE) == load_playbook().entry(NO_SINGLE_CAUSE)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("{days_late:.0f} days past", "{days_lat:.0f} days past", r"quotes \{days_lat\}"),
        ("({edits:.0f}×)", "({edits:.0f×)", r"'listing_changed' fact 'edited' \(en\)"),
        ("region «{region}», pays", "region {region:.1f}, pays", "cannot be filled"),
    ],
)
def test_a_fact_template_that_cannot_be_filled_stops_the_playbook_at_loading(
    tmp_path, old, new, message
):
    text = (load_playbook.__globals__["resources"].files("core") / "playbook.yaml").read_text(
        encoding="utf-8"
    )
    assert old in text
    path = tmp_path / "playbook.yaml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_playbook(path)


def test_the_usual_carriers_reference_rate_is_its_rate_at_the_latest_training_moment():
    moment = pd.Timestamp("2026-05-01", tz="UTC")
    rows = pd.DataFrame(
        {
            "as_of": [moment - 30 * DAY] * 3 + [moment] * 3,
            "carrier": ["A", "A", "B", "A", "A", "B"],
            # Early on the usual carrier looked bad: cancellations resolve before deliveries.
            "carrier_buyer_cancel_rate": [0.9, 0.9, 0.5, 0.12, 0.12, 0.30],
            "region": ["X"] * 6,
            "region_buyer_cancel_rate": [0.8, 0.8, 0.8, 0.2, 0.2, 0.2],
        }
    ).astype({"carrier": "string", "region": "string"})
    reference = build_reference_values(rows, ("carrier", "region"))
    assert reference["carrier"] == "A"
    assert reference["carrier_buyer_cancel_rate"] == 0.12  # not the median of all rows, 0.4
    assert reference["region_buyer_cancel_rate"] == 0.2
    # Without moments to order by, the median over all rows is what is known.
    assert build_reference_values(rows.drop(columns="as_of"), ("carrier", "region"))[
        "carrier_buyer_cancel_rate"
    ] == pytest.approx(0.4)


def test_ozons_russian_names_are_shown_in_the_sellers_language_beside_the_original(shop):
    tables, model, as_of = shop
    features = build_features(tables, as_of, aggregates=model.aggregates)
    cod = features[(features["payment_type"] == "Оплата при получении").to_numpy()].head(300)
    assert len(cod) > 20
    probabilities = model.score_features(cod)
    texts = {}
    for lang in LANGUAGES:
        explained = build_explanations(model, cod, probabilities, lang=lang)
        texts[lang] = [r.facts for e in explained for r in e.reasons if r.code == "buyer_profile"]
    assert texts["en"], "no buyer-profile reason among cash-on-delivery orders"
    assert all("«Cash on delivery (Оплата при получении)»" in t for t in texts["en"])
    assert all("「货到付款 (Оплата при получении)」" in t for t in texts["zh"])
    assert all("«Оплата при получении»" in t for t in texts["ru"])


def test_a_name_without_a_translation_is_shown_as_ozon_gives_it(tmp_path):
    playbook = load_playbook()
    assert playbook.value_name("region", "Москва", "zh") == "莫斯科 (Москва)"
    assert playbook.value_name("region", "Тверская область", "en") == "Тверская область"
    assert playbook.value_name("carrier", "Cainiao 菜鸟国际", "zh") == "Cainiao 菜鸟国际"
    shown = playbook.named_values({"payment": ["СБП", None], "edits": [1.0, 2.0]}, "en")
    assert shown == {"payment": ["Faster Payments System (СБП)", None], "edits": [1.0, 2.0]}
    text = (load_playbook.__globals__["resources"].files("core") / "playbook.yaml").read_text(
        encoding="utf-8"
    )
    own = text[: text.index("\nvalue_names:")] + (
        '\nvalue_names:\n  region:\n    "Москва": {en: Moskva}\n'
    )
    path = tmp_path / "playbook.yaml"
    path.write_text(own, encoding="utf-8")
    edited = load_playbook(path)
    assert edited.value_name("region", "Москва", "en") == "Moskva (Москва)"
    assert edited.value_name("region", "Москва", "zh") == "莫斯科 (Москва)"  # the shipped one
    path.write_text(own.replace("  region:", "  city:"), encoding="utf-8")
    with pytest.raises(ValueError, match="unknown kinds"):
        load_playbook(path)


@pytest.mark.parametrize(
    ("value", "decimals", "shown"),
    [
        (0.999, 0, ">99 %"),
        (0.9995, 1, ">99.9 %"),
        (0.0004, 0, "<1 %"),
        (0.83, 0, "83 %"),
        (0.125, 1, "12.5 %"),
        (1.0, 0, "100 %"),
        (0.0, 0, "0 %"),
        (float("nan"), 0, "?"),
    ],
)
def test_a_probability_between_0_and_1_is_never_shown_as_certain(value, decimals, shown):
    assert percent_text(value, decimals) == shown


def test_a_share_is_measured_on_the_log_odds_towards_the_order_without_its_problems():
    from core.explain import log_odds_share

    # Near certainty a cause moves the probability little, yet takes a third of the way.
    assert log_odds_share(0.999, 0.009, 0.5) == pytest.approx(0.3347, abs=1e-4)
    assert 0.009 / 0.999 < 0.01
    assert log_odds_share(0.3, 0.3 - 0.1, 0.1) == pytest.approx(1.0)  # all of the excess
    assert log_odds_share(0.3, 0.25, 0.1) == 1.0  # more than fixing everything: capped
    assert log_odds_share(0.3, -0.01, 0.1) == 0.0
    # Fixing everything would not lower it, or nothing is known: drop over probability.
    assert log_odds_share(0.3, 0.1, 0.3) == pytest.approx(1 / 3)
    assert log_odds_share(0.2, 0.05, float("nan")) == pytest.approx(0.25)
    assert log_odds_share(0.0, 0.0, 0.0) == 0.0


def test_the_no_problem_probability_fixes_every_applying_cause_at_once(shop):
    from core.counterfactuals import no_problem_probabilities, risk_drop_matrix

    tables, model, as_of = shop
    features = build_features(tables, as_of, aggregates=model.aggregates).head(400)
    matrix = model.build_matrix(features)
    raw = model.predict_matrix_raw(matrix)
    probabilities = model.calibrator.transform(raw)
    floor = no_problem_probabilities(model, matrix, raw, probabilities)
    drops = risk_drop_matrix(model, matrix, raw, probabilities)
    untouched = np.isnan(drops).all(axis=1)
    np.testing.assert_array_equal(floor[untouched], probabilities[untouched])
    assert (~untouched).sum() > 300 and (floor[~untouched] != probabilities[~untouched]).all()
    # Fixing every cause lowers an order at least as much as its best single fix, mostly.
    best = probabilities - np.nanmax(np.where(np.isnan(drops), -np.inf, drops), axis=1)
    assert np.mean(floor[~untouched] <= best[~untouched] + 1e-9) > 0.8
