"""What if the seller acted: each action's risk is the model's score of the order with that
action's causes fixed (or the assumed effect of a conversation with the buyer), offered only
where it fits; the service's answer starts from the very probability ``POST /v1/score`` gives.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from cancel_risk.examples import load_history_records, open_score_requests
from core.costs import CostsConfig
from core.counterfactuals import CAUSES, risk_drop_matrix
from core.features import RUB_PER_UNIT, build_features
from core.playbook import LANGUAGES, WHAT_IF_ACTIONS, load_playbook
from core.whatif import (
    Basis,
    WhatIf,
    build_refund_amounts,
    build_what_ifs,
    format_money,
)
from serving import schemas
from serving.app import create_app
from serving.scoring import ModelScorer, ScoreJob, posting_currency
from serving.settings import ServiceSettings

KEY = "whatif-key-0123456789"
COUNTERFACTUAL_ACTIONS = ("refund_difference", "restore_card", "expedite", "switch_carrier")


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(trained_shop):
    return trained_shop.model


@pytest.fixture(scope="module")
def features(trained_shop) -> pd.DataFrame:
    """The shop's open orders, and copies of some handed-over ones made late and quiet at once
    (both of expedite's causes after the handover)."""
    model = trained_shop.model
    features = build_features(trained_shop.tables, trained_shop.as_of, aggregates=model.aggregates)
    late_and_quiet = features[features["is_handed_over"] == 1].head(20).copy()
    late_and_quiet["hours_since_last_activity"] = 120.0
    late_and_quiet["hours_to_promised_delivery_end"] = -48.0
    late_and_quiet.index = pd.Index(
        [f"{n}-late" for n in late_and_quiet.index], dtype="string", name="posting_number"
    )
    return pd.concat([features, late_and_quiet])


def _numbers(features: pd.DataFrame, column: str) -> np.ndarray:
    return features[column].to_numpy(dtype="float64", na_value=np.nan)


def _what_ifs(model, features: pd.DataFrame, **options: Any) -> tuple[np.ndarray, list]:
    matrix = model.build_matrix(features)
    raw = model.predict_matrix_raw(matrix)
    probabilities = model.calibrator.transform(raw)
    answers = build_what_ifs(
        model,
        matrix,
        raw,
        probabilities,
        _numbers(features, "is_handed_over"),
        _numbers(features, "order_value_rub"),
        _numbers(features, "price_change_pct"),
        options.pop("currencies", ["CNY"] * len(features)),
        **options,
    )
    return probabilities, answers


def _by_action(answers: list[list[WhatIf]], action: str) -> dict[int, WhatIf]:
    return {
        row: what_if
        for row, listed in enumerate(answers)
        for what_if in listed
        if what_if.action == action
    }


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-9, 1 - 1e-9)
    return np.log(p / (1 - p))


# --- counterfactual actions: the model's score of the fixed order ------------------------------


def _fixed_by_hand(features: pd.DataFrame, action: str, reference: dict) -> tuple[Any, Any]:
    """The rows ``action`` fits and their features with its causes fixed, written out here."""
    f = features
    handed = f["is_handed_over"].fillna(0) > 0.5
    fixed = f.copy()
    if action == "refund_difference":
        rows = (
            (f["price_change_pct"] < -0.5)
            | (f["lowest_price_change_pct"] < -0.5)
            | (f["promotion_since_purchase"] > 0)
        )
        for column in ("price_change_pct", "lowest_price_change_pct"):
            fixed[column] = np.fmax(_numbers(f, column), 0.0)
        fixed["price_changes_since_purchase"] = 0.0
        fixed["promotion_since_purchase"] = 0.0
    elif action == "restore_card":
        rows = f["card_edits_since_purchase"] > 0
        fixed["card_edits_since_purchase"] = 0.0
        fixed["hours_since_last_card_edit"] = np.nan
    elif action == "expedite":
        not_shipped = ~handed & (f["is_handed_over"] < 0.5) & (f["hours_since_order"] > 48)
        quiet = (f["is_handed_over"] > 0.5) & (
            (f["hours_since_last_activity"] > 48) | (f["silent_hours_since_handover"] > 0)
        )
        late = handed & (
            (f["hours_to_promised_delivery_end"] < 24) | (f["delivery_date_changes"] > 0)
        )
        rows = not_shipped | quiet | late
        # Before the handover: shipped a day after the order, scanned half a day ago.
        fixed.loc[not_shipped, "is_handed_over"] = 1.0
        fixed.loc[not_shipped, "hours_since_handover"] = np.fmax(
            _numbers(f[not_shipped], "hours_since_order") - 24.0, 1.0
        )
        moving = not_shipped | quiet
        fixed.loc[moving, "hours_since_last_activity"] = np.fmin(
            _numbers(f[moving], "hours_since_last_activity"), 12.0
        )
        # After it: tracking that moves again, and a promise that is kept, together.
        fixed.loc[quiet, "hours_since_last_scan"] = np.minimum(  # an unknown scan stays unknown
            _numbers(f[quiet], "hours_since_last_scan"), 12.0
        )
        silent = quiet & f["silent_hours_since_handover"].notna()
        fixed.loc[silent, "silent_hours_since_handover"] = 0.0
        fixed.loc[late, "hours_to_promised_delivery_end"] = np.fmax(
            _numbers(f[late], "hours_to_promised_delivery_end"), 72.0
        )
        fixed.loc[late, ["delivery_date_changes", "delivery_date_shift_hours"]] = 0.0
    else:
        assert action == "switch_carrier"
        rows = f["carrier_buyer_cancel_rate"] > reference["carrier_buyer_cancel_rate"]
        for column in ("carrier", "carrier_buyer_cancel_rate", "promised_lead_time_hours"):
            fixed[column] = reference[column]
        fixed["carrier"] = fixed["carrier"].astype("string")
    return rows.to_numpy(dtype=bool, na_value=False), fixed


@pytest.mark.parametrize("action", COUNTERFACTUAL_ACTIONS)
def test_a_counterfactual_action_is_the_models_score_of_the_order_with_its_causes_fixed(
    model, features, action
):
    probabilities, answers = _what_ifs(model, features)
    listed = _by_action(answers, action)
    fits, fixed = _fixed_by_hand(features, action, model.metadata["reference_values"])
    # Offered exactly where one of its causes applies, and only there.
    assert sorted(listed) == np.flatnonzero(fits).tolist()
    assert fits.sum() >= 20, "the shop has orders this action fits"
    rows = np.flatnonzero(fits)
    raw = model.score_raw(features.iloc[rows])
    raw_fixed = model.score_raw(fixed.iloc[rows])
    expected = 1 / (1 + np.exp(-(_logit(probabilities[rows]) + _logit(raw_fixed) - _logit(raw))))
    after = np.array([listed[row].probability_after for row in rows])
    np.testing.assert_allclose(after, expected, rtol=1e-9, atol=1e-12)
    levels = model.risk_levels(after)
    for k, row in enumerate(rows):
        what_if = listed[row]
        assert what_if.basis == "counterfactual"
        assert what_if.probability_before == probabilities[row]
        assert what_if.risk_drop == probabilities[row] - after[k]
        assert what_if.risk_level_after == levels[k]


def test_expedite_after_the_handover_fixes_lateness_and_silence_together_in_one_call(
    model, features, monkeypatch
):
    planted = features[features.index.str.endswith("-late").to_numpy(dtype=bool)]
    matrix = model.build_matrix(planted)
    raw = model.predict_matrix_raw(matrix)
    probabilities = model.calibrator.transform(raw)
    scored: list[np.ndarray] = []
    predict = model.predict_matrix_raw

    def counting(variants: np.ndarray) -> np.ndarray:
        scored.append(variants.copy())
        return predict(variants)

    monkeypatch.setattr(model, "predict_matrix_raw", counting)
    build_what_ifs(
        model,
        matrix,
        raw,
        probabilities,
        _numbers(planted, "is_handed_over"),
        _numbers(planted, "order_value_rub"),
        _numbers(planted, "price_change_pct"),
        ["CNY"] * len(planted),
    )
    (variants,) = scored  # every variant of every order in one booster call
    column = {name: variants[:, i] for i, name in enumerate(model.feature_columns)}
    # Only expedite's variants keep the promise (72 hours ahead instead of 48 hours late) ...
    kept = column["hours_to_promised_delivery_end"] == 72.0
    assert kept.sum() == len(planted)
    # ... and the same variant rows have the tracking moving again.
    assert (column["hours_since_last_activity"][kept] == 12.0).all()
    assert (column["delivery_date_changes"][kept] == 0.0).all()
    assert (column["hours_since_last_activity"][~kept] == 120.0).all()


def test_an_action_fixing_one_cause_lowers_the_risk_as_much_as_its_reason(model, features):
    matrix = model.build_matrix(features)
    raw = model.predict_matrix_raw(matrix)
    probabilities, answers = _what_ifs(model, features)
    drops = risk_drop_matrix(model, matrix, raw, probabilities)
    before_handover = features["is_handed_over"].to_numpy() < 0.5
    for action, cause in [
        ("refund_difference", "price_drop"),
        ("restore_card", "listing_changed"),
        ("switch_carrier", "slow_carrier"),
        ("expedite", "not_shipped"),
    ]:
        listed = _by_action(answers, action)
        if cause == "not_shipped":  # expedite's one cause before the handover
            listed = {row: w for row, w in listed.items() if before_handover[row]}
        column = drops[:, CAUSES.index(cause)]
        rows = np.flatnonzero(~np.isnan(column))
        assert sorted(listed) == rows.tolist() and rows.size
        for row in rows:
            assert listed[row].risk_drop == pytest.approx(column[row], abs=1e-12)


# --- assumed-effect actions --------------------------------------------------------------------


def test_confirming_and_holding_are_the_assumed_effects_and_holding_only_before_the_handover(
    model, features
):
    costs = CostsConfig(contact_effect=0.3, hold_effect=0.6)
    probabilities, answers = _what_ifs(model, features, costs=costs)
    confirm = _by_action(answers, "confirm_with_buyer")
    hold = _by_action(answers, "hold_and_confirm")
    handed = features["is_handed_over"].to_numpy() > 0.5
    assert sorted(confirm) == list(range(len(features)))
    assert sorted(hold) == np.flatnonzero(~handed).tolist() and hold
    for row, what_if in confirm.items():
        assert what_if.basis == "assumed_effect"
        assert what_if.probability_after == pytest.approx(probabilities[row] * 0.7, rel=1e-12)
    for row, what_if in hold.items():
        assert what_if.basis == "assumed_effect"
        assert what_if.probability_after == pytest.approx(probabilities[row] * 0.4, rel=1e-12)
        assert what_if.risk_drop == pytest.approx(probabilities[row] * 0.6, rel=1e-12)
    # The model's own costs by default.
    _, default = _what_ifs(model, features.iloc[:5])
    effect = model.metadata.get("costs", {}).get("contact_effect", 0.25)
    first = _by_action(default, "confirm_with_buyer")[0]
    assert first.probability_after == pytest.approx(first.probability_before * (1 - effect))


def test_actions_come_in_the_fixed_order(model, features):
    _, answers = _what_ifs(model, features)
    for listed in answers:
        codes = [what_if.action for what_if in listed]
        assert codes == sorted(codes, key=WHAT_IF_ACTIONS.index)
        assert len(set(codes)) == len(codes)


# --- the refund --------------------------------------------------------------------------------


def test_the_refund_is_todays_price_difference_in_the_postings_currency():
    amounts = build_refund_amounts(
        np.array([460.0, 1200.0, 3400.0, 1000.0, np.nan, 1000.0, 1000.0, 1000.0]),
        np.array([-100.0, -100.0, -10.0, 5.0, -10.0, np.nan, -10.0, -10.0]),
        ["CNY", "RUB", "USD", "CNY", "CNY", "CNY", None, "XTS"],
    )
    assert amounts == [40.0, 1200.0, 4.0, 0.0, None, None, None, None]
    assert format_money(40.0, "CNY") == "¥40.00"
    assert format_money(1200.0, "RUB") == "₽1,200.00"
    assert format_money(40.0, "USD") == "40.00 USD"


def test_a_known_price_drop_gets_its_amount_in_the_title(model, features):
    drops = features["price_change_pct"] < -5
    chosen = features[drops.to_numpy(dtype=bool, na_value=False)].head(3)
    assert len(chosen) == 3
    for lang, template in [("en", "Refund the price difference ({})"), ("zh", "退还差价（{}）")]:
        _, answers = _what_ifs(model, chosen, lang=lang)
        for k, listed in enumerate(answers):
            refund = listed[0]
            assert refund.action == "refund_difference" and refund.currency == "CNY"
            value, pct = chosen["order_value_rub"].iloc[k], chosen["price_change_pct"].iloc[k]
            assert refund.amount == round(value * -pct / 100 / RUB_PER_UNIT["CNY"], 2)
            assert refund.title == template.format(format_money(refund.amount, "CNY"))
    # An unknown currency: the refund is still offered, without an amount.
    _, answers = _what_ifs(model, chosen, currencies=[None] * 3, lang="ru")
    refund = answers[0][0]
    assert (refund.amount, refund.currency) == (None, None)
    assert refund.title == "Верните разницу в цене"


def test_every_action_has_a_title_in_every_language(model, features):
    titles = {}
    for lang in LANGUAGES:
        _, answers = _what_ifs(model, features, lang=lang)
        titles[lang] = {
            (row, w.action): w.title for row, listed in enumerate(answers) for w in listed
        }
    assert titles["en"].keys() == titles["zh"].keys() == titles["ru"].keys()
    assert {action for _, action in titles["en"]} == set(WHAT_IF_ACTIONS)
    for key in titles["en"]:
        texts = [titles[lang][key] for lang in LANGUAGES]
        assert all(texts) and len(set(texts)) == 3, texts
        assert "?" not in "".join(texts) and "{" not in "".join(texts)
    carrier = model.metadata["reference_values"]["carrier"]
    switch = [title for (_, action), title in titles["zh"].items() if action == "switch_carrier"]
    assert switch[0] == f"改用店铺常用的承运商（{carrier}）"
    ship = {t for (row, a), t in titles["en"].items() if a == "expedite"}
    assert ship == {"Ship today", "Get the parcel moving: escalate it with the carrier"}
    with pytest.raises(ValueError, match="lang"):
        _what_ifs(model, features.iloc[:2], lang="de")


# --- the playbook ------------------------------------------------------------------------------


def _shipped_text() -> str:
    files = load_playbook.__globals__["resources"].files("core")
    return (files / "playbook.yaml").read_text(encoding="utf-8")


def test_a_playbook_without_the_what_if_section_uses_the_shipped_titles(tmp_path: Path):
    text = _shipped_text()
    path = tmp_path / "playbook.yaml"
    path.write_text(text[: text.index("\nwhat_if:")] + "\n", encoding="utf-8")
    older = load_playbook(path)
    assert older.what_if is None
    for action in WHAT_IF_ACTIONS:
        assert older.what_if_entry(action) == load_playbook().what_if_entry(action)
    # One action of the seller's own, the others shipped.
    edited = text.replace("Confirm the order with the buyer\n      zh", "Call the buyer\n      zh")
    start = edited.index("\nwhat_if:")
    own = edited[:start] + "\nwhat_if:\n" + edited[edited.index("  confirm_with_buyer:") :]
    path.write_text(own, encoding="utf-8")
    partial = load_playbook(path)
    assert partial.what_if_entry("confirm_with_buyer").title.en == "Call the buyer"
    assert partial.what_if_entry("expedite") == load_playbook().what_if_entry("expedite")


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("({amount})", "({amont})", r"what_if 'refund_difference' title \(en\) quotes \{amont\}"),
        ("({carrier})", "({carrier:.1f})", "cannot be filled"),
        ("  restore_card:\n    title:", "  restore_cart:\n    title:", "unknown actions"),
    ],
)
def test_a_what_if_title_that_cannot_be_used_stops_the_playbook_at_loading(
    tmp_path: Path, old: str, new: str, message: str
):
    text = _shipped_text()
    assert old in text
    path = tmp_path / "playbook.yaml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_playbook(path)


def test_the_shipped_playbook_titles_every_action():
    shipped = load_playbook().what_if
    assert shipped is not None and tuple(shipped) == WHAT_IF_ACTIONS
    assert shipped["refund_difference"].without_amount is not None
    assert shipped["switch_carrier"].without_carrier is not None
    assert shipped["expedite"].before_handover is not None


# --- the service -------------------------------------------------------------------------------


def test_the_posting_currency_is_its_first_products_code_whatever_the_shape():
    assert posting_currency({"products": [{"currency_code": " CNY "}]}) == "CNY"
    assert posting_currency({"products": [{"currency_code": ""}, {"currency_code": "RUB"}]}) == (
        "RUB"
    )
    for odd in (
        None,
        "posting",
        [],
        {},
        {"products": None},
        {"products": "CNY"},
        {"products": [None, 5, "x", {"currency_code": 643}, {"currency_code": None}]},
        {"products": [{"currency_code": ["CNY"]}]},
    ):
        assert posting_currency(odd) is None


def test_schema_enums_match_the_what_if_contract():
    assert schemas.WhatIfAction.__args__ == WHAT_IF_ACTIONS
    assert schemas.WhatIfBasis.__args__ == Basis.__args__


@pytest.fixture(scope="module")
def open_requests(trained_shop) -> list[dict[str, Any]]:
    records = load_history_records(trained_shop.history_dir)
    as_of = int(trained_shop.as_of.value) // 1000 * 1000
    found = open_score_requests(records, as_of, latest_per_kind=20)
    shipping = [r for r in found if r["posting"]["status"] == "delivering"][:4]
    waiting = [r for r in found if r["posting"]["status"] != "delivering"][:4]
    assert len(shipping) == len(waiting) == 4
    return shipping + waiting


def _job(request: dict[str, Any], lang: str = "en") -> ScoreJob:
    as_of = int(pd.Timestamp(request["as_of"]).value)
    return ScoreJob(
        request["posting"], request["pushes"], request["prices"], request["tracking"], as_of, lang
    )


def test_the_scorers_what_if_starts_from_the_probability_it_scores(model, open_requests):
    scorer = ModelScorer(model)
    for prepare in (scorer.prepare_fast, scorer.prepare_reference):
        jobs = [_job(r, lang) for r, lang in zip(open_requests, LANGUAGES * 3, strict=False)]
        prepared = [prepare(job, job.as_of, ()) for job in jobs]
        assert all(p is not None for p in prepared)
        scored = scorer.score(prepared)
        currencies = [posting_currency(r["posting"]) for r in open_requests]
        answers = scorer.what_if(prepared, currencies)
        for s, a, p in zip(scored, answers, prepared, strict=True):
            assert a.probability == s.probability and a.risk_level == s.risk_level
            assert a.posting_number == s.posting_number and a.currency == "CNY"
            assert a.path == p.path
            assert a.actions and all(w.probability_before == s.probability for w in a.actions)
            handed = p.row["is_handed_over"] > 0.5
            assert ("hold_and_confirm" in {w.action for w in a.actions}) is not handed
    assert scorer.what_if([], []) == []


@pytest.fixture(scope="module")
def client(trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    settings = ServiceSettings(
        model_uri=str(trained_model_dir),
        api_keys=(KEY,),
        model_cache_dir=tmp_path_factory.mktemp("whatif-cache"),
    )
    with TestClient(create_app(settings), headers={"X-API-Key": KEY}) as test_client:
        yield test_client


def test_the_route_answers_the_probability_of_the_score_route_and_each_action(
    client: TestClient, open_requests
):
    for request in open_requests:
        scored = client.post("/v1/score", json=request)
        answer = client.post("/v1/whatif", json=request)
        assert scored.status_code == answer.status_code == 200, answer.text
        scored, body = scored.json(), answer.json()
        assert set(body) == {
            "posting_number", "as_of", "probability", "risk_level", "currency", "actions", "model",
        }  # fmt: skip
        for key in ("posting_number", "as_of", "probability", "risk_level", "model"):
            assert body[key] == scored[key]
        assert body["currency"] == "CNY"
        actions = [a["action"] for a in body["actions"]]
        assert actions[-2:] == ["confirm_with_buyer", "hold_and_confirm"] or (
            request["posting"]["status"] == "delivering" and actions[-1] == "confirm_with_buyer"
        )
        for action in body["actions"]:
            assert set(action) == {
                "action", "title", "basis", "probability_after", "risk_level_after",
                "risk_drop", "amount", "currency",
            }  # fmt: skip
            assert action["risk_drop"] == pytest.approx(
                body["probability"] - action["probability_after"], abs=1e-12
            )
    titles = {
        lang: client.post("/v1/whatif", json={**open_requests[0], "lang": lang}).json()["actions"]
        for lang in LANGUAGES
    }
    assert len({tuple(a["title"] for a in listed) for listed in titles.values()}) == 3


def test_a_price_cut_in_the_request_is_refunded_in_the_postings_currency(
    client: TestClient, open_requests
):
    request = copy.deepcopy(open_requests[0])
    (product,) = request["posting"]["products"]
    paid = float(product["price"]) * product["quantity"]
    as_of = datetime.fromisoformat(request["as_of"].replace("Z", "+00:00"))
    cut_at = (as_of - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    request["prices"] = [p for p in request["prices"] if p["at"] < cut_at] + [
        {
            "offer_id": product["offer_id"],
            "at": cut_at,
            "price": f"{float(product['price']) * 0.8:.2f}",
            "currency_code": "CNY",
        }
    ]
    response = client.post("/v1/whatif", json=request)
    assert response.status_code == 200, response.text
    refund = response.json()["actions"][0]
    assert refund["action"] == "refund_difference" and refund["basis"] == "counterfactual"
    assert refund["currency"] == "CNY"
    assert refund["amount"] == pytest.approx(paid * 0.2, abs=0.011)
    assert (
        refund["title"] == f"Refund the price difference ({format_money(refund['amount'], 'CNY')})"
    )


def test_the_route_refuses_what_the_score_route_refuses(client: TestClient, open_requests):
    request = open_requests[0]
    for headers in ({"X-API-Key": ""}, {"X-API-Key": "wrong"}):
        response = client.post("/v1/whatif", json=request, headers=headers)
        assert response.status_code == 401 and response.json()["detail"]
    assert TestClient(client.app).post("/v1/whatif", json=request).status_code == 401
    bad_price = copy.deepcopy(request)
    bad_price["posting"]["products"][0]["price"] = "-5"
    cases = [
        ({"posting": "not an object"}, ["body", "posting"]),
        ({**request, "lang": "de"}, ["body", "lang"]),
        ({**request, "price": []}, ["body", "price"]),
        ({**request, "as_of": "1999-01-01T00:00:00Z"}, ["body", "as_of"]),
        (bad_price, ["body", "posting", "products", 0, "price"]),
    ]
    for body, loc in cases:
        response = client.post("/v1/whatif", json=body)
        score = client.post("/v1/score", json=body)
        assert response.status_code == score.status_code == 422, response.text
        assert response.json() == score.json()
        assert response.json()["detail"][0]["loc"] == loc
    malformed = client.post(
        "/v1/whatif", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert malformed.status_code == 422 and malformed.json()["detail"][0]["loc"]


def test_the_openapi_document_describes_the_route_as_the_score_route(client: TestClient):
    document = client.get("/openapi.json").json()
    what_if, score = document["paths"]["/v1/whatif"]["post"], document["paths"]["/v1/score"]["post"]
    assert what_if["requestBody"] == score["requestBody"]
    assert set(what_if["responses"]) == set(score["responses"])
    assert what_if["security"] == score["security"]
    assert what_if["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/WhatIfResponse"
    }
