"""Alert channels and the outbox sender, over real HTTP against a local recording server.

A real book (SQLite in ``tmp_path``) gets a posting and a high-risk score through its own
functions, so the outbox holds alerts as the live mode raises them; the sender then posts them
to a server on 127.0.0.1 that records every request and answers as told. The tests prove each
kind's body is its vendor's shape with a signature that verifies, the texts are in the channel's
language, a failing channel is retried with a growing backoff and recorded as failing, a
recovered one gets its alert exactly once, an alert is raised once per posting, key and channel,
and configuration mistakes are named precisely without quoting a credential.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import logging
import random
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote_plus, urlsplit

import pytest
from sqlalchemy import select

from core.playbook import load_playbook
from live import alerts, schema
from live.alerts import (
    AlertSender,
    ChannelConfig,
    check_response,
    failing_channels,
    parse_channels,
    render,
    retry_delay_seconds,
)
from live.book import (
    AlertRule,
    DueAlert,
    OrderBook,
    ScoreRecord,
    accept_posting,
    channel_health,
    record_scores,
)

SECOND = 1_000_000_000
T0 = 1_717_243_200 * SECOND  # 2024-06-01 12:00:00 UTC
POSTING = "87654321-0012-1"
PUBLIC_URL = "https://risk.example.com/"
TOKEN = "123456789:AAFakeTokenForTests_0123456789abcdef"
WEBHOOK_SECRET = "webhook-signing-key-0123"
FEISHU_SECRET = "feishu-signing-key-4567"
DINGTALK_SECRET = "SECdingtalk-signing-key-89ab"
WECOM_KEY = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
DINGTALK_TOKEN = "dingtalk-access-token-cdef0123"

EXPLANATIONS: dict[str, Any] = {
    "en": {
        "reasons": [
            {
                "code": "price_drop",
                "share": 0.46,
                "risk_drop": 0.38,
                "facts": "price -12 % since purchase",
            },
            {
                "code": "late_delivery",
                "share": 0.21,
                "risk_drop": 0.17,
                "facts": "promised date in 0.5 days",
            },
        ],
        "actions": [
            "Hold and confirm with the buyer before handover",
            "Offer the buyer the difference as a coupon",
        ],
        "decision": "hold_and_confirm",
        "expected_saving": 412.5,
    },
    "zh": {
        "reasons": [
            {
                "code": "price_drop",
                "share": 0.46,
                "risk_drop": 0.38,
                "facts": "下单后价格变动 -12%",
            },
            {
                "code": "late_delivery",
                "share": 0.21,
                "risk_drop": 0.17,
                "facts": "承诺日期还有 0.5 天",
            },
        ],
        "actions": ["暂缓发货，先与买家确认", "向买家发放差价优惠券"],
        "decision": "hold_and_confirm",
        "expected_saving": 412.5,
    },
    "ru": {
        "reasons": [
            {
                "code": "price_drop",
                "share": 0.46,
                "risk_drop": 0.38,
                "facts": "цена -12 % с момента покупки",
            },
            {
                "code": "buyer_profile",
                "share": 0.21,
                "risk_drop": 0.17,
                "facts": "регион <Москва & область>",
            },
        ],
        "actions": ["Придержите заказ и подтвердите его с покупателем до передачи в доставку"],
        "decision": "hold_and_confirm",
        "expected_saving": 412.5,
    },
}


# --- a recording HTTP server ----------------------------------------------------------------------


@dataclass
class Recorded:
    path: str
    query: str
    headers: Message  # case-insensitive, as HTTP header names are
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Server:
    """Records requests; answers each path prefix as :meth:`answer` last told it."""

    base: str = ""
    requests: list[Recorded] = field(default_factory=list)
    answers: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, prefix: str, status: int, body: Any) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        with self.lock:
            self.answers[prefix] = (status, raw)

    def to(self, prefix: str) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.path.startswith(prefix)]

    def respond(self, path: str) -> tuple[int, bytes]:
        with self.lock:
            for prefix, answer in self.answers.items():
                if path.startswith(prefix):
                    return answer
        # Echo the path: a server that quotes the request back (with a token in it) is the case
        # the sender's scrubbing exists for.
        return 404, f"no route for {path}".encode()


VENDOR_OK: dict[str, Any] = {
    "/hook": {"received": True},
    "/wecom": {"errcode": 0, "errmsg": "ok"},
    "/feishu": {"code": 0, "msg": "success", "data": {}},
    "/dingtalk": {"errcode": 0, "errmsg": "ok"},
    "/bot": {"ok": True, "result": {"message_id": 1}},
}


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            parts = urlsplit(self.path)
            with state.lock:
                state.requests.append(Recorded(parts.path, parts.query, self.headers, body))
            status, answer = state.respond(parts.path)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *_args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    for prefix, body in VENDOR_OK.items():
        state.answer(prefix, 200, body)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


# --- a real book ----------------------------------------------------------------------------------


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * SECOND)


@pytest.fixture
def book(tmp_path: Any) -> Iterator[OrderBook]:
    held = OrderBook("sqlite:///" + str(tmp_path / "b.db"))
    try:
        yield held
    finally:
        held.close()


def score(
    book: OrderBook,
    channels: list[str],
    *,
    posting: str = POSTING,
    probability: float = 0.83,
    level: str = "high",
    at: int = T0,
    explanations: dict[str, Any] = EXPLANATIONS,
) -> list[int]:
    """Accept the posting (if new) and record one score; the ids of the alerts it raised."""
    with book.engine.begin() as connection:
        accept_posting(
            connection,
            {"posting_number": posting, "status": "awaiting_packaging", "products": []},
            at,
        )
        record = ScoreRecord(
            posting_number=posting,
            event_seq=1,
            as_of=at,
            trigger="push",
            model_name="cancel-risk",
            model_version="7",
            probability=probability,
            risk_level=level,
            explanations=explanations,
        )
        return record_scores(
            connection, [record], [], scored_at=at, rule=AlertRule(), channels=channels
        )


def alert_rows(book: OrderBook) -> list[Any]:
    with book.engine.connect() as connection:
        return list(connection.execute(select(schema.alerts).order_by(schema.alerts.c.id)))


def channels_of(server: Server) -> list[ChannelConfig]:
    return parse_channels(
        json.dumps(
            [
                {
                    "kind": "webhook",
                    "url": f"{server.base}/hook/risk",
                    "secret": WEBHOOK_SECRET,
                    "headers": {"Authorization": "Bearer erp-key-000"},
                },
                {"kind": "wecom", "url": f"{server.base}/wecom/send?key={WECOM_KEY}"},
                {
                    "kind": "feishu",
                    "url": f"{server.base}/feishu/open-apis/bot/v2/hook/abcdef0123456789",
                    "secret": FEISHU_SECRET,
                },
                {
                    "kind": "dingtalk",
                    "url": f"{server.base}/dingtalk/robot/send?access_token={DINGTALK_TOKEN}",
                    "secret": DINGTALK_SECRET,
                },
                {
                    "kind": "telegram",
                    "token": TOKEN,
                    "chat_id": -1001234567890,
                    "api_base": server.base,
                },
            ]
        )
    )


def sender(book: OrderBook, channels: list[ChannelConfig], clock: Clock, **kw: Any) -> AlertSender:
    return AlertSender(book.engine, channels, PUBLIC_URL, clock, jitter=0.0, **kw)


# --- every kind, as its vendor documents it -------------------------------------------------------


def test_each_kind_sends_its_vendors_shape_signed_and_in_its_language(
    book: OrderBook, server: Server
) -> None:
    channels = channels_of(server)
    assert [c.name for c in channels] == ["webhook", "wecom", "feishu", "dingtalk", "telegram"]
    assert len(score(book, [c.name for c in channels])) == 5
    clock = Clock(T0 + 3 * SECOND)
    playbook = load_playbook()

    with sender(book, channels, clock) as alert_sender:
        report = alert_sender.send_due()
    assert report == alerts.SendReport(sent=5, failed=0)
    assert len(server.requests) == 5

    (hook,) = server.to("/hook")
    assert hook.headers["Content-Type"] == "application/json"
    assert hook.headers["Authorization"] == "Bearer erp-key-000"
    expected = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), hook.body, hashlib.sha256).hexdigest()
    assert hook.headers["X-Cancel-Risk-Signature"] == expected
    payload = hook.json()
    assert set(payload) == {
        "event", "alert_id", "posting_number", "alert_key", "level", "probability", "as_of",
        "lang", "reasons", "actions", "decision", "expected_saving", "url",
    }  # fmt: skip
    assert payload["event"] == "cancel_risk.alert"
    assert payload["posting_number"] == POSTING
    assert (payload["alert_key"], payload["level"], payload["lang"]) == ("high", "high", "en")
    assert payload["probability"] == pytest.approx(0.83)
    assert payload["as_of"] == "2024-06-01T12:00:00.000000Z"
    assert payload["url"] == f"https://risk.example.com/v1/postings/{POSTING}"
    assert [set(r) for r in payload["reasons"]] == [{"code", "title", "share", "facts"}] * 2
    assert payload["reasons"][0] == {
        "code": "price_drop",
        "title": playbook.entry("price_drop").title.en,
        "share": 0.46,
        "facts": "price -12 % since purchase",
    }
    assert payload["actions"] == EXPLANATIONS["en"]["actions"]
    assert (payload["decision"], payload["expected_saving"]) == ("hold_and_confirm", 412.5)

    (wecom,) = server.to("/wecom")
    assert parse_qs(wecom.query) == {"key": [WECOM_KEY]}
    body = wecom.json()
    assert set(body) == {"msgtype", "markdown"} and body["msgtype"] == "markdown"
    assert set(body["markdown"]) == {"content"}
    content = body["markdown"]["content"]
    assert content.startswith("## 订单取消风险：高\n")
    for text in (POSTING, "83%", "2024-06-01 12:00 UTC", "下单后降价", "占风险 46%",
                 "下单后价格变动 -12%", "暂缓发货，先与买家确认", "查看详情"):  # fmt: skip
        assert text in content
    assert "Cancellation" not in content
    assert len(content.encode()) <= 4096

    (feishu,) = server.to("/feishu")
    body = feishu.json()
    assert set(body) == {"timestamp", "sign", "msg_type", "content"}
    assert body["timestamp"] == str(clock.now // SECOND)
    key = f"{body['timestamp']}\n{FEISHU_SECRET}".encode()
    digest = hmac.new(key, b"", hashlib.sha256).digest()
    assert body["sign"] == base64.b64encode(digest).decode()
    assert body["msg_type"] == "post"
    post = body["content"]["post"]["zh_cn"]
    assert post["title"] == "订单取消风险：高"
    assert all(isinstance(row, list) and row for row in post["content"])
    tags = {element["tag"] for row in post["content"] for element in row}
    assert tags == {"text", "a"}
    texts = " ".join(e["text"] for row in post["content"] for e in row)
    assert "货件号：" + POSTING in texts and "取消概率：83%" in texts and "下单后降价" in texts
    link = post["content"][-1][0]
    assert link["href"] == f"https://risk.example.com/v1/postings/{POSTING}"

    (ding,) = server.to("/dingtalk")
    query = parse_qs(ding.query)
    assert set(query) == {"access_token", "timestamp", "sign"}
    assert query["access_token"] == [DINGTALK_TOKEN]
    timestamp = query["timestamp"][0]
    assert timestamp == str(clock.now // 1_000_000)  # milliseconds
    string_to_sign = f"{timestamp}\n{DINGTALK_SECRET}".encode()
    digest = hmac.new(DINGTALK_SECRET.encode(), string_to_sign, hashlib.sha256).digest()
    assert query["sign"] == [base64.b64encode(digest).decode()]
    assert "sign=" + quote_plus(base64.b64encode(digest).decode()) in ding.query  # urlencoded once
    body = ding.json()
    assert set(body) == {"msgtype", "markdown"} and body["msgtype"] == "markdown"
    assert set(body["markdown"]) == {"title", "text"}
    assert body["markdown"]["title"].startswith("订单取消风险：高")
    assert body["markdown"]["text"].startswith("### 订单取消风险：高\n\n")
    assert "下单后降价" in body["markdown"]["text"]

    (telegram,) = server.to("/bot")
    assert telegram.path == f"/bot{TOKEN}/sendMessage"
    body = telegram.json()
    assert set(body) == {"chat_id", "text", "parse_mode"}
    assert body["chat_id"] == "-1001234567890" and body["parse_mode"] == "HTML"
    text = body["text"]
    assert text.startswith("<b>Риск отмены заказа: высокий</b>\n")
    assert "Вероятность отмены: <b>83 %</b>" in text
    assert f"<code>{POSTING}</code>" in text
    assert playbook.entry("price_drop").title.ru in text
    assert playbook.entry("buyer_profile").title.ru in text
    assert "регион &lt;Москва &amp; область&gt;" in text and "<Москва" not in text
    assert "Придержите заказ" in text
    assert f'<a href="https://risk.example.com/v1/postings/{POSTING}">Подробнее</a>' in text

    rows = alert_rows(book)
    assert all(row.sent_at == clock.now and row.attempts == 1 for row in rows)
    clock.advance(24 * 3600)
    with sender(book, channels, clock) as alert_sender:
        assert alert_sender.send_due() == alerts.SendReport()
    assert len(server.requests) == 5  # sent once, never again


def test_no_secret_no_signature_and_no_public_url_no_link(book: OrderBook, server: Server) -> None:
    channels = parse_channels(
        json.dumps(
            [
                {"kind": "webhook", "url": f"{server.base}/hook", "lang": "zh"},
                {"kind": "feishu", "url": f"{server.base}/feishu/hook/x", "lang": "en"},
                {"kind": "dingtalk", "url": f"{server.base}/dingtalk/send?access_token=t"},
            ]
        )
    )
    score(book, [c.name for c in channels])
    clock = Clock(T0)
    with AlertSender(book.engine, channels, None, clock, jitter=0.0) as alert_sender:
        assert alert_sender.send_due().sent == 3
    (hook,) = server.to("/hook")
    assert "X-Cancel-Risk-Signature" not in hook.headers
    assert hook.json()["url"] is None and hook.json()["lang"] == "zh"
    assert hook.json()["reasons"][0]["title"] == "下单后降价"
    (feishu,) = server.to("/feishu")
    assert set(feishu.json()) == {"msg_type", "content"}
    post = feishu.json()["content"]["post"]["en_us"]
    assert post["title"] == "Cancellation risk: high"
    assert all(e["tag"] == "text" for row in post["content"] for e in row)
    (ding,) = server.to("/dingtalk")
    assert parse_qs(ding.query) == {"access_token": ["t"]}


# --- failures, backoff, recovery ------------------------------------------------------------------


def test_failing_channel_backs_off_is_reported_then_recovers_and_sends_once(
    book: OrderBook, server: Server
) -> None:
    (channel,) = parse_channels(
        json.dumps([{"kind": "dingtalk", "url": f"{server.base}/dingtalk/send?access_token=t"}])
    )
    (alert_id,) = score(book, [channel.name])
    clock = Clock(T0)
    alert_sender = sender(book, [channel], clock)

    def row() -> Any:
        (held,) = alert_rows(book)
        assert held.id == alert_id
        return held

    def health() -> Any:
        with book.engine.connect() as connection:
            (entry,) = channel_health(connection, [channel.name])
        return entry

    server.answer("/dingtalk", 500, b"upstream down")
    assert alert_sender.send_due() == alerts.SendReport(sent=0, failed=1)
    assert row().next_attempt_at == T0 + 10 * SECOND
    assert row().sent_at is None and row().attempts == 1
    assert row().last_error == "HTTP 500: upstream down"
    assert health().consecutive_failures == 1 and health().unsent == 1
    assert [h.channel for h in failing_channels(book.engine, [channel])] == ["dingtalk"]

    clock.advance(5)  # not due yet: nothing is sent
    assert alert_sender.send_due() == alerts.SendReport()
    assert len(server.to("/dingtalk")) == 1

    server.answer("/dingtalk", 200, {"errcode": 310000, "errmsg": "sign not match"})
    gaps = []
    for failures in (2, 3):
        clock.now = row().next_attempt_at
        before = clock.now
        assert alert_sender.send_due().failed == 1
        gaps.append(row().next_attempt_at - before)
        assert row().attempts == failures
        assert row().last_error == "errcode 310000: sign not match"
        assert health().consecutive_failures == failures
    assert gaps == [20 * SECOND, 40 * SECOND]  # doubling
    assert health().last_error == "errcode 310000: sign not match"

    server.answer("/dingtalk", 200, {"errcode": 0, "errmsg": "ok"})
    clock.now = row().next_attempt_at
    assert alert_sender.send_due() == alerts.SendReport(sent=1)
    assert row().sent_at == clock.now and row().last_error is None
    assert health().consecutive_failures == 0 and health().last_ok_at == clock.now
    assert health().unsent == 0
    assert failing_channels(book.engine, [channel]) == []
    for _ in range(3):
        clock.advance(7200)
        assert alert_sender.send_due() == alerts.SendReport()
    assert len(server.to("/dingtalk")) == 4  # three failures, one delivery, nothing after
    alert_sender.close()


def test_a_channel_failing_in_a_pass_is_not_tried_again_but_others_are(
    book: OrderBook, server: Server
) -> None:
    channels = parse_channels(
        json.dumps(
            [
                {"kind": "wecom", "url": f"{server.base}/wecom/send?key=k"},
                {"kind": "webhook", "url": f"{server.base}/hook"},
            ]
        )
    )
    for number in ("1-1", "2-1", "3-1"):
        score(book, [c.name for c in channels], posting=number)
    server.answer("/wecom", 200, {"errcode": 45009, "errmsg": "api freq out of limit"})
    clock = Clock(T0)
    with sender(book, channels, clock) as alert_sender:
        assert alert_sender.send_due() == alerts.SendReport(sent=3, failed=3)
    assert len(server.to("/wecom")) == 1 and len(server.to("/hook")) == 3
    wecom_rows = [r for r in alert_rows(book) if r.channel == "wecom"]
    assert all(r.sent_at is None and r.next_attempt_at == T0 + 10 * SECOND for r in wecom_rows)
    assert sum("not tried" in r.last_error for r in wecom_rows) == 2
    with book.engine.connect() as connection:
        (wecom,) = channel_health(connection, ["wecom"])
    assert wecom.consecutive_failures == 1  # one real attempt, one failure


def test_a_crash_between_send_and_commit_sends_again(
    book: OrderBook, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    (channel,) = parse_channels(json.dumps([{"kind": "webhook", "url": f"{server.base}/hook"}]))
    score(book, [channel.name])
    clock = Clock(T0)
    alert_sender = sender(book, [channel], clock)

    def crash(*_args: Any) -> None:
        raise RuntimeError("power cut")

    with monkeypatch.context() as patch:
        patch.setattr(alerts, "mark_alert_sent", crash)
        with pytest.raises(RuntimeError):
            alert_sender.send_due()
    assert alert_sender.send_due().sent == 1  # at least once: the receiver sees it twice
    first, second = server.to("/hook")
    assert first.json()["alert_id"] == second.json()["alert_id"]
    assert alert_sender.send_due() == alerts.SendReport()


def test_an_unconfigured_channels_alert_stays_unsent_and_is_logged_once(
    book: OrderBook, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    (channel,) = parse_channels(json.dumps([{"kind": "webhook", "url": f"{server.base}/hook"}]))
    score(book, ["webhook", "retired-robot"])
    clock = Clock(T0)
    alert_sender = sender(book, [channel], clock)
    with caplog.at_level(logging.WARNING, logger="live.alerts"):
        assert alert_sender.send_due() == alerts.SendReport(sent=1, unconfigured=1)
        (retired,) = [r for r in alert_rows(book) if r.channel == "retired-robot"]
        assert retired.sent_at is None
        assert retired.next_attempt_at == T0 + 3600 * SECOND  # put aside, not in every pass
        clock.advance(3600)
        assert alert_sender.send_due() == alerts.SendReport(unconfigured=1)
    warnings = [r for r in caplog.records if "retired-robot" in r.getMessage()]
    assert len(warnings) == 1
    assert len(server.requests) == 1


def test_errors_and_logs_never_hold_a_credential(
    book: OrderBook, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    channels = channels_of(server)
    server.answers.clear()  # every answer a 404 quoting the request's path back
    score(book, [c.name for c in channels])
    with caplog.at_level(logging.DEBUG), sender(book, channels, Clock(T0)) as alert_sender:
        assert alert_sender.send_due().failed == 5
    telegram_row = next(r for r in alert_rows(book) if r.channel == "telegram")
    assert telegram_row.last_error.startswith("HTTP 404: no route for /bot***/sendMessage")
    stored = " ".join(r.last_error for r in alert_rows(book))
    logged = caplog.text + repr(channels) + str(channels)
    for secret in (TOKEN, WEBHOOK_SECRET, FEISHU_SECRET, DINGTALK_SECRET, WECOM_KEY,
                   DINGTALK_TOKEN, "abcdef0123456789", "erp-key-000"):  # fmt: skip
        assert secret not in stored and secret not in logged
    request = render(channels[4], _due(), None)
    assert TOKEN in request.url and TOKEN not in repr(request)


def test_a_score_that_cannot_be_rendered_fails_alone(book: OrderBook, server: Server) -> None:
    (channel,) = parse_channels(json.dumps([{"kind": "wecom", "url": f"{server.base}/wecom/s"}]))
    broken = {"zh": {"reasons": [{"code": "price_drop", "share": "lots", "facts": ""}]}}
    score(book, ["wecom"], posting="1-1", explanations=broken)
    score(book, ["wecom"], posting="2-1")
    with sender(book, [channel], Clock(T0)) as alert_sender:
        assert alert_sender.send_due() == alerts.SendReport(sent=1, failed=1)
    bad, good = alert_rows(book)
    assert bad.sent_at is None and bad.next_attempt_at == T0 + 10 * SECOND
    assert bad.last_error.startswith("cannot render the alert: ValueError")
    assert good.sent_at is not None
    assert failing_channels(book.engine, [channel]) == []  # the robot is fine


def test_an_unreachable_channel_is_a_failure_with_the_transport_error(book: OrderBook) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (channel,) = parse_channels(
        json.dumps([{"kind": "webhook", "url": f"http://127.0.0.1:{port}"}])
    )
    score(book, ["webhook"])
    with sender(book, [channel], Clock(T0), timeout_seconds=2.0) as alert_sender:
        assert alert_sender.send_due() == alerts.SendReport(failed=1)
    (row,) = alert_rows(book)
    assert row.last_error.startswith("ConnectError") and row.sent_at is None
    assert [h.channel for h in failing_channels(book.engine, [channel])] == ["webhook"]


# --- the outbox raises an alert once --------------------------------------------------------------


def test_the_same_posting_key_and_channel_is_raised_once(book: OrderBook, server: Server) -> None:
    (channel,) = parse_channels(json.dumps([{"kind": "wecom", "url": f"{server.base}/wecom/s"}]))
    first = score(book, ["wecom"], probability=0.83, level="high", at=T0)
    assert len(first) == 1
    assert score(book, ["wecom"], probability=0.2, level="low", at=T0 + SECOND) == []
    # Back into high: the rule raises "high" again, and the outbox keeps the first one only.
    assert score(book, ["wecom"], probability=0.9, level="high", at=T0 + 2 * SECOND) == []
    assert len(alert_rows(book)) == 1
    with sender(book, [channel], Clock(T0 + 10 * SECOND)) as alert_sender:
        assert alert_sender.send_due() == alerts.SendReport(sent=1)
        assert alert_sender.send_due() == alerts.SendReport()
    assert len(server.to("/wecom")) == 1


# --- backoff --------------------------------------------------------------------------------------


def test_retry_delays_double_to_an_hour_and_jitter_stays_below_the_nominal() -> None:
    assert [retry_delay_seconds(n) for n in (1, 2, 3, 4)] == [10.0, 20.0, 40.0, 80.0]
    assert retry_delay_seconds(9) == 2560.0
    assert retry_delay_seconds(10) == 3600.0
    assert retry_delay_seconds(100_000) == 3600.0  # retried forever, never overflowing
    rng = random.Random(7)
    for failures in range(1, 15):
        nominal = retry_delay_seconds(failures)
        draws = [retry_delay_seconds(failures, jitter=0.25, rng=rng) for _ in range(50)]
        assert all(0.75 * nominal <= d <= nominal for d in draws)
        assert len(set(draws)) > 1
    assert retry_delay_seconds(2, jitter=0.25, rng=rng) > retry_delay_seconds(1)  # still grows


# --- answers --------------------------------------------------------------------------------------


def _channel(kind: str) -> ChannelConfig:
    if kind == "telegram":
        return ChannelConfig(kind="telegram", token=TOKEN, chat_id="1")
    return ChannelConfig(kind=kind, url="https://robot.example/send")


@pytest.mark.parametrize(
    ("kind", "status", "body", "expected"),
    [
        ("webhook", 204, b"", None),
        ("webhook", 200, b"not json", None),
        ("webhook", 503, b"", "HTTP 503"),
        ("wecom", 200, b'{"errcode":0,"errmsg":"ok"}', None),
        ("wecom", 200, b'{"errcode":93000,"errmsg":"invalid webhook url"}',
         "errcode 93000: invalid webhook url"),
        ("wecom", 200, b"<html>gateway</html>", "unexpected answer: <html>gateway</html>"),
        ("wecom", 502, b"bad gateway", "HTTP 502: bad gateway"),
        ("dingtalk", 200, b'{"errcode":310000,"errmsg":"keywords not in content"}',
         "errcode 310000: keywords not in content"),
        ("dingtalk", 200, b'{"errmsg":"ok"}', 'no errcode in the answer: {"errmsg":"ok"}'),
        ("feishu", 200, b'{"code":0,"msg":"success","data":{}}', None),
        ("feishu", 200, b'{"Extra":null,"StatusCode":0,"StatusMessage":"success"}', None),
        ("feishu", 400, b'{"code":19021,"msg":"sign match fail"}',
         "HTTP 400; code 19021: sign match fail"),
        ("telegram", 200, b'{"ok":true,"result":{}}', None),
        ("telegram", 400, b'{"ok":false,"error_code":400,"description":"Bad Request: no chat"}',
         "HTTP 400; error_code 400: Bad Request: no chat"),
        ("telegram", 500, b'{"ok":true}', 'HTTP 500: {"ok":true}'),
    ],
)  # fmt: skip
def test_check_response_reads_each_vendors_answer(
    kind: str, status: int, body: bytes, expected: str | None
) -> None:
    assert check_response(_channel(kind), status, body) == expected


# --- configuration --------------------------------------------------------------------------------


def test_parse_channels_fills_names_and_languages() -> None:
    assert parse_channels("") == [] and parse_channels("  \n") == []
    channels = parse_channels(
        json.dumps(
            [
                {"kind": "wecom", "url": "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=a"},
                {"kind": "wecom", "url": "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=b"},
                {"name": "wecom-2", "kind": "wecom", "url": "https://q.example/send?key=c"},
                {"kind": "feishu", "url": "https://open.feishu.cn/open-apis/bot/v2/hook/x"},
                {"kind": "dingtalk", "url": "https://oapi.dingtalk.com/robot/send?access_token=y"},
                {"kind": "telegram", "token": TOKEN, "chat_id": "@shop_staff"},
                {"kind": "webhook", "url": "https://erp.example/hook", "lang": "ru"},
            ]
        )
    )
    assert [c.name for c in channels] == [
        "wecom", "wecom-3", "wecom-2", "feishu", "dingtalk", "telegram", "webhook",
    ]  # fmt: skip
    assert [c.lang for c in channels] == ["zh", "zh", "zh", "zh", "zh", "ru", "ru"]
    assert channels[5].api_base == "https://api.telegram.org"
    assert channels[5].chat_id == "@shop_staff"
    assert "key=a" not in repr(channels) and TOKEN not in repr(channels)
    assert channels[0].display_url == "https://qyapi.weixin.qq.com/…"


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        ("{not json", "CANCEL_RISK_ALERT_CHANNELS is not valid JSON"),
        ({"kind": "wecom"}, "CANCEL_RISK_ALERT_CHANNELS must be a JSON list"),
        (["wecom"], "CANCEL_RISK_ALERT_CHANNELS[0]: must be an object, not str"),
        ([{"kind": "slack", "url": "https://s.example"}], "CANCEL_RISK_ALERT_CHANNELS[0].kind:"),
        ([{"url": "https://s.example"}], "CANCEL_RISK_ALERT_CHANNELS[0].kind: Field required"),
        ([{"kind": "webhook", "url": "https://a.example"}, {"kind": "wecom"}],
         "CANCEL_RISK_ALERT_CHANNELS[1].url: required for a wecom channel"),
        ([{"kind": "wecom", "url": "ftp://q.example/x"}],
         "CANCEL_RISK_ALERT_CHANNELS[0].url: must be an http:// or https:// address"),
        ([{"kind": "telegram", "chat_id": "1"}],
         "CANCEL_RISK_ALERT_CHANNELS[0].token: required for a telegram channel"),
        ([{"kind": "telegram", "token": "not-a-token", "chat_id": "1"}],
         "CANCEL_RISK_ALERT_CHANNELS[0].token: not a bot token"),
        ([{"kind": "telegram", "token": TOKEN}],
         "CANCEL_RISK_ALERT_CHANNELS[0].chat_id: required for a telegram channel"),
        ([{"kind": "wecom", "url": "https://q.example/s", "secret": "abcd"}],
         "CANCEL_RISK_ALERT_CHANNELS[0].secret: a wecom channel does not sign its messages"),
        ([{"kind": "wecom", "url": "https://q.example/s", "token": TOKEN}],
         "CANCEL_RISK_ALERT_CHANNELS[0].token: applies to telegram channels only, not wecom"),
        ([{"kind": "feishu", "url": "https://f.example/h", "headers": {"X-A": "1"}}],
         "CANCEL_RISK_ALERT_CHANNELS[0].headers: applies to webhook channels only"),
        ([{"kind": "webhook", "url": "https://w.example", "headers": {"Content-Type": "x"}}],
         "CANCEL_RISK_ALERT_CHANNELS[0].headers: 'Content-Type' is set by the sender itself"),
        ([{"kind": "wecom", "url": "https://q.example/s", "lang": "de"}],
         "CANCEL_RISK_ALERT_CHANNELS[0].lang: Input should be 'zh', 'ru' or 'en'"),
        ([{"kind": "wecom", "url": "https://q.example/s", "colour": "red"}],
         "CANCEL_RISK_ALERT_CHANNELS[0].colour: not a channel field"),
        ([{"name": "ops", "kind": "wecom", "url": "https://q.example/s"},
          {"name": "ops", "kind": "webhook", "url": "https://w.example"}],
         "CANCEL_RISK_ALERT_CHANNELS[1].name: 'ops' is already the name of a channel"),
        ([{"name": "", "kind": "wecom", "url": "https://q.example/s"}],
         "CANCEL_RISK_ALERT_CHANNELS[0].name:"),
    ],
)  # fmt: skip
def test_parse_channels_names_the_item_the_field_and_why(items: Any, expected: str) -> None:
    text = items if isinstance(items, str) else json.dumps(items)
    with pytest.raises(ValueError) as caught:
        parse_channels(text)
    message = str(caught.value)
    assert expected in message
    assert TOKEN not in message and "abcd" not in message


def test_parse_channels_reports_every_bad_item_at_once() -> None:
    with pytest.raises(ValueError) as caught:
        parse_channels(json.dumps([{"kind": "wecom"}, {"kind": "webhook", "url": "x"}]))
    message = str(caught.value)
    assert "CANCEL_RISK_ALERT_CHANNELS[0].url" in message
    assert "CANCEL_RISK_ALERT_CHANNELS[1].url" in message


def _due() -> DueAlert:
    return DueAlert(
        id=1,
        posting_number=POSTING,
        alert_key="high",
        channel="telegram",
        attempts=0,
        as_of=T0,
        probability=0.83,
        risk_level="high",
        explanations=EXPLANATIONS,
    )


def test_render_is_pure_given_its_clock_and_falls_back_to_english() -> None:
    channel = ChannelConfig(kind="feishu", url="https://f.example/hook/x", secret="k" * 8)
    assert render(channel, _due(), None, signed_at_ns=T0) == render(
        channel, _due(), None, signed_at_ns=T0
    )
    english_only = dataclasses.replace(_due(), explanations={"en": EXPLANATIONS["en"]})
    wecom = ChannelConfig(kind="wecom", url="https://q.example/s")
    content = json.loads(render(wecom, english_only, None).body)["markdown"]["content"]
    assert "订单取消风险：高" in content and "下单后降价" in content  # playbook titles in zh
    assert "price -12 % since purchase" in content  # facts as the score has them
