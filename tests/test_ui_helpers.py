"""The dashboard's small helpers (``live/ui.py``, ``live/ui_text.py``), without a server.

Sessions: a token is issued for a valid key only and validates until it expires, and any change
to it, another secret, or the key's removal from the settings ends it. The language: the cookie,
else the browser's weighted ``Accept-Language``. Redirect targets stay inside ``/ui``. The orders
page's URL parameters: what is not understood is ignored, and a query survives the round trip
through its own link. Every text exists in every language.
"""

from __future__ import annotations

from urllib.parse import parse_qs

import pytest
from starlette.requests import Request

from core.playbook import LANGUAGES
from live.dashboard import PAGE_SIZE, OrderQuery
from live.ui import (
    LANG_COOKIE,
    Sessions,
    _query_from,
    _query_params,
    choose_language,
    local_path,
)
from live.ui_text import BUCKETS, LANGUAGE_NAMES, all_keys_complete, bucket_label, texts
from serving.security import KeyRing
from serving.settings import ServiceSettings

SECRET = b"s" * 32
HOURS = 12.0
NOW = 1_772_000_000  # seconds
SCORING_KEYS = ("scoring-key-1", "scoring-key-2")
ADMIN_KEY = "admin-key"


# --- sessions -------------------------------------------------------------------------------------


def key_ring(api_keys=SCORING_KEYS, admin_key: str | None = ADMIN_KEY) -> KeyRing:
    return KeyRing(ServiceSettings(api_keys=api_keys, admin_key=admin_key))


@pytest.fixture
def sessions() -> Sessions:
    return Sessions(key_ring(), SECRET, HOURS)


@pytest.mark.parametrize("key", [*SCORING_KEYS, ADMIN_KEY])
def test_a_valid_key_gets_a_token_that_validates(sessions, key):
    token = sessions.issue(key, now=NOW)
    assert token is not None
    key_id, expires, signature = token.split(".")
    assert int(expires) == NOW + int(HOURS * 3600)
    assert key_id == key_ring().session_id(key)
    assert len(signature) == 64
    assert key not in token  # the cookie holds no key
    assert sessions.valid(token, now=NOW)
    assert sessions.valid(token, now=NOW + HOURS * 3600 - 1)


def test_keys_get_tokens_of_their_own(sessions):
    first, second = (sessions.issue(key, now=NOW) for key in SCORING_KEYS)
    assert first.split(".")[0] != second.split(".")[0]
    # The same key at the same moment: the same token (it depends on nothing else).
    assert sessions.issue(SCORING_KEYS[0], now=NOW) == first


@pytest.mark.parametrize(
    "key",
    ["wrong", "", "scoring-key-1 ", "SCORING-KEY-1", "scoring-key", None],
    ids=["wrong", "empty", "trailing-space", "case", "prefix", "none"],
)
def test_a_wrong_key_gets_no_token(sessions, key):
    assert sessions.issue(key, now=NOW) is None


def test_no_key_configured_gets_no_token():
    assert Sessions(key_ring((), None), SECRET, HOURS).issue("anything", now=NOW) is None


def _tampered(token: str, sessions: Sessions) -> dict[str, str]:
    key_id, expires, signature = token.split(".")
    other_id = key_ring().session_id(SCORING_KEYS[1])
    flipped = ("0" if signature[0] != "0" else "1") + signature[1:]
    return {
        "later-expiry": f"{key_id}.{int(expires) + 3600}.{signature}",
        "earlier-expiry": f"{key_id}.{int(expires) - 1}.{signature}",
        "another-key-id": f"{other_id}.{expires}.{signature}",
        "changed-id": f"{key_id[:-1]}{'0' if key_id[-1] != '0' else '1'}.{expires}.{signature}",
        "changed-signature": f"{key_id}.{expires}.{flipped}",
        "short-signature": f"{key_id}.{expires}.{signature[:-2]}",
        "upper-signature": f"{key_id}.{expires}.{signature.upper()}",
        "no-signature": f"{key_id}.{expires}.",
        "two-parts": f"{key_id}.{expires}",
        "four-parts": f"{token}.{signature}",
        "extra-dot": f"{key_id}..{expires}.{signature}",
        "one-part": key_id,
        "dots-only": "..",
        "empty": "",
        "spaces": f" {token}",
        # Signed with the right secret, but the expiry is not a number.
        "signed-word-expiry": _signed(sessions, key_id, "never"),
        "signed-negative-expiry": _signed(sessions, key_id, "-1"),
        "signed-empty-id": _signed(sessions, "", str(NOW + 3600)),
    }


def _signed(sessions: Sessions, key_id: str, expires: str) -> str:
    payload = f"{key_id}.{expires}"
    return f"{payload}.{sessions._sign(payload)}"


TAMPERINGS = [
    "later-expiry",
    "earlier-expiry",
    "another-key-id",
    "changed-id",
    "changed-signature",
    "short-signature",
    "upper-signature",
    "no-signature",
    "two-parts",
    "four-parts",
    "extra-dot",
    "one-part",
    "dots-only",
    "empty",
    "spaces",
    "signed-word-expiry",
    "signed-negative-expiry",
    "signed-empty-id",
]


@pytest.mark.parametrize("how", TAMPERINGS)
def test_a_tampered_token_fails(sessions, how):
    token = sessions.issue(SCORING_KEYS[0], now=NOW)
    assert sessions.valid(token, now=NOW + 1)
    assert sessions.valid(_tampered(token, sessions)[how], now=NOW + 1) is False


def test_no_token_fails(sessions):
    assert sessions.valid(None, now=NOW) is False


@pytest.mark.parametrize(
    "token",
    ["a.1.\u00e9", "\u00e9.1.abc", "\u00c3\u00a9.\u00c3\u00a9.\u00c3\u00a9"],
    ids=["non-ascii-signature", "non-ascii-id", "latin-1-mojibake"],
)
def test_a_token_with_non_ascii_characters_fails_without_raising(sessions, token):
    """A cookie is whatever the browser sends (Starlette decodes its bytes as Latin-1): a
    malformed one is not a session, never an error of the page."""
    assert sessions.valid(token, now=NOW) is False


def test_an_expired_token_fails(sessions):
    token = sessions.issue(ADMIN_KEY, now=NOW)
    expires = NOW + int(HOURS * 3600)
    assert sessions.valid(token, now=expires - 1)
    assert sessions.valid(token, now=expires - 0.5)
    assert sessions.valid(token, now=expires) is False
    assert sessions.valid(token, now=expires + 1) is False
    assert sessions.valid(token, now=expires + 10**9) is False


def test_a_token_signed_with_another_secret_fails(sessions):
    token = sessions.issue(SCORING_KEYS[0], now=NOW)
    for secret in (b"t" * 32, b"", SECRET + b"x"):
        assert Sessions(key_ring(), secret, HOURS).valid(token, now=NOW + 1) is False
    # Another process with the same secret (the settings') accepts it.
    assert Sessions(key_ring(), SECRET, HOURS).valid(token, now=NOW + 1)


def test_a_token_of_a_key_no_longer_configured_fails(sessions):
    removed, kept = (sessions.issue(key, now=NOW) for key in SCORING_KEYS)
    admin = sessions.issue(ADMIN_KEY, now=NOW)
    restarted = Sessions(key_ring((SCORING_KEYS[1],), None), SECRET, HOURS)
    assert restarted.valid(removed, now=NOW + 1) is False
    assert restarted.valid(admin, now=NOW + 1) is False
    assert restarted.valid(kept, now=NOW + 1)
    assert restarted.issue(SCORING_KEYS[0], now=NOW) is None
    # A key that becomes the admin key keeps its sessions: the id is of the key, not its scope.
    promoted = Sessions(key_ring((), SCORING_KEYS[0]), SECRET, HOURS)
    assert promoted.valid(removed, now=NOW + 1)


def test_session_ids_of_the_key_ring():
    ring = key_ring()
    ids = [ring.session_id(key) for key in (*SCORING_KEYS, ADMIN_KEY)]
    assert all(isinstance(i, str) and len(i) == 32 for i in ids)
    assert len(set(ids)) == 3
    assert all(ring.knows_session_id(i) for i in ids)
    assert ring.session_id("wrong") is None
    assert ring.session_id(None) is None
    assert ring.knows_session_id("0" * 32) is False
    assert ring.knows_session_id("") is False
    assert key_ring((SCORING_KEYS[1],), None).knows_session_id(ids[0]) is False


# --- the language ---------------------------------------------------------------------------------


def request_with(cookie: str | None = None, accept_language: str | None = None) -> Request:
    headers = []
    if cookie is not None:
        headers.append((b"cookie", cookie.encode("latin-1")))
    if accept_language is not None:
        headers.append((b"accept-language", accept_language.encode("latin-1")))
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/ui",
        "raw_path": b"/ui",
        "query_string": b"",
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "root_path": "",
        "headers": headers,
    }
    return Request(scope)


@pytest.mark.parametrize(
    ("cookie", "accept_language", "expected"),
    [
        pytest.param(f"{LANG_COOKIE}=ru", "zh-CN,zh;q=0.9", "ru", id="cookie-wins"),
        pytest.param(f"{LANG_COOKIE}=zh", None, "zh", id="cookie-alone"),
        pytest.param(f"other=1; {LANG_COOKIE}=en", "ru", "en", id="cookie-among-others"),
        pytest.param(f"{LANG_COOKIE}=de", "ru", "ru", id="unknown-cookie-ignored"),
        pytest.param(f"{LANG_COOKIE}=", "zh", "zh", id="empty-cookie-ignored"),
        pytest.param(f"{LANG_COOKIE}=RU", "zh", "zh", id="cookie-is-exact"),
        pytest.param(None, "ru;q=0.5, zh-CN;q=0.9, en;q=0.1", "zh", id="weights"),
        pytest.param(None, "en;q=0.1, ru;q=0.5", "ru", id="weights-not-order"),
        pytest.param(None, "ru, zh;q=0.9", "ru", id="no-weight-is-1"),
        pytest.param(None, "zh-CN,zh;q=0.9,en;q=0.8", "zh", id="chrome-style"),
        pytest.param(None, "ZH-tw", "zh", id="case"),
        pytest.param(None, "de-DE, fr;q=0.9, ru;q=0.2", "ru", id="first-known"),
        pytest.param(None, "de-DE, fr;q=0.9", "en", id="unknown"),
        pytest.param(None, "", "en", id="empty"),
        pytest.param(None, None, "en", id="absent"),
        pytest.param(None, "*", "en", id="star"),
        pytest.param(None, "zh;q=abc, ru;q=0.5", "ru", id="malformed-q-ignored"),
        pytest.param(None, "zh;q=, ru;q=0.5", "ru", id="empty-q-ignored"),
        pytest.param(None, "zh;q=0.9.1, ru;q=0.1", "ru", id="two-dots-q-ignored"),
        pytest.param(None, ",,, ;q=1, ru", "ru", id="empty-parts"),
        pytest.param(None, "zh, en", "zh", id="equal-weights-keep-the-order"),
    ],
)
def test_choose_language(cookie, accept_language, expected):
    assert choose_language(request_with(cookie, accept_language)) == expected


@pytest.mark.parametrize(
    ("accept_language", "expected"),
    [
        pytest.param("zh;q=nan, ru;q=0.5", "ru", id="nan"),
        pytest.param("zh;q=inf, ru;q=0.5", "ru", id="inf"),
        pytest.param("zh;q=5, ru;q=0.5", "ru", id="above-1"),
        pytest.param("zh;q=-1, ru;q=0.5", "ru", id="negative"),
    ],
)
def test_choose_language_ignores_q_values_outside_the_grammar(accept_language, expected):
    """RFC 9110 §12.4.2: a qvalue is a number from 0 to 1 with at most three decimals;
    ``nan``, ``inf``, 5 or -1 are malformed, ignored like ``q=abc``."""
    assert choose_language(request_with(None, accept_language)) == expected


def test_choose_language_reads_whitespace_around_the_weight():
    """RFC 9110: ``weight = OWS ";" OWS "q=" qvalue``: ``ru ; q=0.8`` weighs 0.8."""
    assert choose_language(request_with(None, "en;q=0.2, ru ; q=0.8")) == "ru"
    assert choose_language(request_with(None, "en;q=0.2, ru; q=0.8")) == "ru"


# --- redirect targets -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/ui",
        "/ui?risk=high",
        "/ui?risk=high&sort=age&dir=asc&page=2",
        "/ui/orders/48213907-0114-1",
        "/ui/causes",
        "/ui/orders/rows?carrier=Ural%20Logistics",
    ],
)
def test_local_path_keeps_the_dashboards_paths(target):
    assert local_path(target) == target


@pytest.mark.parametrize(
    "target",
    [
        None,
        "",
        "https://evil.example/ui",
        "http://evil.example",
        "//evil.example/ui",
        "///evil.example",
        "/ui//evil.example",
        "\\\\evil.example",
        "/ui\\evil.example",
        "/\\evil.example",
        "/ui/../v1/live/status",
        "/v1/live/status",
        "/",
        "ui",
        "javascript:alert(1)",
        "/uiadmin",
        "/ui-other",
        "/ui.evil",
    ],
)
def test_local_path_refuses_everything_else(target):
    assert local_path(target) == "/ui"
    assert local_path(target, default="/ui/login") == "/ui/login"


# --- the orders page's URL parameters -------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        pytest.param({}, OrderQuery(), id="nothing"),
        pytest.param({"sort": "price"}, OrderQuery(), id="unknown-sort"),
        pytest.param({"sort": "AGE"}, OrderQuery(), id="sort-case"),
        pytest.param({"sort": " age "}, OrderQuery(sort="age"), id="sort-trimmed"),
        pytest.param({"risk": "critical"}, OrderQuery(), id="unknown-risk"),
        pytest.param({"risk": "unscored"}, OrderQuery(), id="unscored-risk"),
        pytest.param({"risk": "high"}, OrderQuery(risk="high"), id="risk"),
        pytest.param({"page": "-1"}, OrderQuery(), id="negative-page"),
        pytest.param({"page": "0"}, OrderQuery(), id="page-0"),
        pytest.param({"page": "two"}, OrderQuery(), id="word-page"),
        pytest.param({"page": "inf"}, OrderQuery(), id="inf-page"),
        pytest.param({"page": "nan"}, OrderQuery(), id="nan-page"),
        pytest.param({"page": "2.5"}, OrderQuery(), id="fraction-page"),
        pytest.param({"page": ""}, OrderQuery(), id="empty-page"),
        pytest.param({"page": "3"}, OrderQuery(page=3), id="page"),
        pytest.param({"page": str(10**12)}, OrderQuery(page=1_000_000), id="huge-page-capped"),
        pytest.param({"age": "-2"}, OrderQuery(), id="negative-age"),
        pytest.param({"age": "old"}, OrderQuery(), id="word-age"),
        pytest.param({"age": "inf"}, OrderQuery(), id="inf-age"),
        pytest.param({"age": "-inf"}, OrderQuery(), id="minus-inf-age"),
        pytest.param({"age": "nan"}, OrderQuery(), id="nan-age"),
        pytest.param({"age": "1e400"}, OrderQuery(), id="overflowing-age"),
        pytest.param({"age": "2.5"}, OrderQuery(min_age_days=2.5), id="age"),
        pytest.param({"age": "0"}, OrderQuery(min_age_days=0.0), id="age-0"),
        pytest.param({"dir": "asc"}, OrderQuery(descending=False), id="ascending"),
        pytest.param({"dir": "up"}, OrderQuery(), id="unknown-direction"),
        pytest.param(
            {"carrier": "  Ural Logistics ", "region": "", "decision": "   "},
            OrderQuery(carrier="Ural Logistics"),
            id="texts-trimmed-empty-ignored",
        ),
        pytest.param({"unknown": "1", "page_size": "1"}, OrderQuery(), id="unknown-parameters"),
    ],
)
def test_query_from_ignores_what_it_does_not_understand(params, expected):
    assert _query_from(params) == expected
    assert _query_from(params).page_size == PAGE_SIZE


def parse(params: str) -> OrderQuery:
    return _query_from({name: values[0] for name, values in parse_qs(params).items()})


ROUND_TRIPS = [
    OrderQuery(),
    OrderQuery(risk="high"),
    OrderQuery(risk="low", sort="age", descending=False, page=3),
    OrderQuery(sort="posting", page=1_000_000),
    OrderQuery(sort="saving", descending=True, page=2, min_age_days=2.5),
    OrderQuery(min_age_days=0.0),
    OrderQuery(min_age_days=14.0),
    OrderQuery(carrier="Ural Logistics, 义乌仓 Yiwu", region="Москва & область", decision="ship"),
    OrderQuery(carrier="a=b&c=d?#%", region="+ plus +"),
    OrderQuery(
        risk="medium",
        carrier="Ozon",
        region="Тверь",
        decision="hold_and_confirm",
        min_age_days=7.0,
        sort="risk",
        descending=False,
        page=9,
    ),
]


@pytest.mark.parametrize("query", ROUND_TRIPS)
def test_query_params_round_trip(query):
    assert parse(_query_params(query)) == query


def test_query_params_leave_the_defaults_out_and_apply_changes():
    assert _query_params(OrderQuery()) == ""
    assert _query_params(OrderQuery(risk="high", page=2), page="3") == "risk=high&page=3"
    assert _query_params(OrderQuery(risk="high"), risk=None) == ""
    assert parse(_query_params(OrderQuery(sort="age"), dir="asc")) == OrderQuery(
        sort="age", descending=False
    )


@pytest.mark.parametrize(
    "days",
    [1 / 24, 0.1234567, 1234567.0, 10.000001],
    ids=["an-hour", "seven-digits", "a-million-days", "a-tenth-of-a-second"],
)
def test_query_params_keep_the_age_exactly(days):
    """An age the page accepted (``?age=0.0416666...``, an hour) survives its own links."""
    query = OrderQuery(min_age_days=days)
    assert parse(_query_params(query)) == query


# --- the page's words -----------------------------------------------------------------------------


def test_every_text_exists_in_every_language():
    assert all_keys_complete() == []
    assert set(LANGUAGE_NAMES) == set(LANGUAGES)
    keys = {lang: set(texts(lang)) for lang in LANGUAGE_NAMES}
    assert keys["zh"] == keys["ru"] == keys["en"]
    assert {"app", "level_high", "level_unscored", "table_caption"} <= keys["en"]
    for lang in LANGUAGE_NAMES:
        assert all(isinstance(v, str) and v.strip() for v in texts(lang).values()), lang


def test_texts_are_translated():
    assert texts("en")["nav_orders"] == "Open orders"
    assert texts("zh")["nav_orders"] == "在途订单"
    assert texts("ru")["nav_orders"] == "Открытые заказы"
    # The placeholders of a text are the same in every language.
    for key in texts("en"):
        fields = {lang: _fields(texts(lang)[key]) for lang in LANGUAGE_NAMES}
        assert fields["zh"] == fields["ru"] == fields["en"], key


def _fields(text: str) -> set[str]:
    import string

    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def test_bucket_label():
    assert bucket_label("under 1 day", "zh") == "不到 1 天"
    assert bucket_label("under 1 day", "ru") == "менее 1 дня"
    assert bucket_label("under 1 day", "en") == "under 1 day"
    assert bucket_label("Ural Logistics", "ru") == "Ural Logistics"  # a carrier's name
    assert bucket_label("", "zh") == ""
    assert bucket_label("under 1 day", "de") == "under 1 day"
    for label, words in BUCKETS.items():
        assert set(words) == {"zh", "ru"}, label
        assert bucket_label(label, "zh") == words["zh"] != label
        assert bucket_label(label, "ru") == words["ru"] != label
        assert bucket_label(label, "en") == label
