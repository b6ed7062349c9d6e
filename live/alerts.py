"""The alert channels and the outbox sender: a high-risk posting, told to the seller's staff.

:func:`live.book.record_scores` puts an alert into the outbox (``book_alerts``) once per
posting, alert key and channel. :class:`AlertSender` sends what is due to the channels named in
``CANCEL_RISK_ALERT_CHANNELS`` (:func:`parse_channels`), a JSON list such as::

    [{"kind": "wecom", "url": "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=..."},
     {"kind": "feishu", "url": "https://open.feishu.cn/open-apis/bot/v2/hook/...",
      "secret": "..."},
     {"kind": "dingtalk", "url": "https://oapi.dingtalk.com/robot/send?access_token=...",
      "secret": "SEC..."},
     {"kind": "telegram", "token": "123456:ABC...", "chat_id": "-1001234567890"},
     {"name": "erp", "kind": "webhook", "url": "https://erp.example/hooks/risk",
      "secret": "...", "headers": {"Authorization": "Bearer ..."}}]

Each item: ``name`` (unique; default the kind, then ``kind-2``, ``kind-3``, ...: it is the name
the outbox and ``book_channels`` keep, so renaming a channel leaves its unsent alerts behind),
``kind``, ``url`` (the robot's or the webhook's address), ``lang`` (``zh``, ``ru`` or ``en``;
default ``zh`` for WeCom, Feishu and DingTalk, ``ru`` for Telegram, ``en`` for the webhook),
``secret`` (the "signature" security setting of a Feishu or DingTalk robot; for the webhook,
the key of the ``X-Cancel-Risk-Signature`` header), ``token`` and ``chat_id`` (Telegram),
``api_base`` (Telegram, default ``https://api.telegram.org``) and ``headers`` (webhook). A robot
address carries its own credential (WeCom's ``key``, Feishu's hook id, DingTalk's
``access_token``), so addresses, secrets, tokens and header values are ``SecretStr``: never in a
repr, a log line or a stored error.

Each kind speaks its vendor's incoming-robot format (:func:`render`) and reads its vendor's
answer (:func:`check_response`):

- ``webhook``: the JSON object of :func:`webhook_payload` (``event`` is ``cancel_risk.alert``),
  ``Content-Type: application/json``; with a secret, ``X-Cancel-Risk-Signature: sha256=<hex>``,
  the HMAC-SHA256 of the exact body under the secret. Any 2xx answer is a delivery. A receiver
  should deduplicate on ``alert_id`` (the same for every retry of an alert).
- ``wecom`` (企业微信群机器人): ``{"msgtype": "markdown", "markdown": {"content": ...}}``
  (content at most 4096 bytes); delivered when the answer is ``{"errcode": 0, ...}``.
- ``feishu`` (飞书自定义机器人): a rich-text ``post`` message; with a secret, ``timestamp``
  (seconds) and ``sign`` = base64(HMAC-SHA256(key=f"{timestamp}\\n{secret}", msg=b"")) in the
  body; delivered when the answer's ``code`` (older robots: ``StatusCode``) is 0.
- ``dingtalk`` (钉钉自定义机器人): ``{"msgtype": "markdown", "markdown": {"title", "text"}}``;
  with a secret, ``timestamp`` (milliseconds) and ``sign`` = urlencode(base64(HMAC-SHA256(
  key=secret, msg=f"{timestamp}\\n{secret}"))) added to the address's query; delivered when
  the answer is ``{"errcode": 0, ...}``. A robot secured by keywords needs one that the
  heading holds (风险, risk, риск).
- ``telegram``: ``POST {api_base}/bot{token}/sendMessage`` with ``chat_id``, ``text`` and
  ``parse_mode: HTML`` (every quoted text HTML-escaped); delivered when the answer has
  ``"ok": true``.

Every message is in its channel's language: the heading (``订单取消风险：高``, ``Риск отмены
заказа: высокий``, ``Cancellation risk: high``), the posting number, the probability, the
moment of the score, the top reasons (the playbook's title, the facts, the share of the risk)
and the first action, with a link to the posting when the service has a public address.

**Delivery is at least once.** The sender reads the due alerts in one short transaction, sends
each outside any transaction, and records the outcome in another short one; a crash (or a lost
database) between a send and its commit sends that alert again on the next pass. Run one sender
per book: two would send the same due alert twice.

**An alert is never dropped.** A failed delivery (an HTTP error, a timeout, a vendor's errcode,
a vendor's rate limit) is retried after 10 s, doubling up to one hour, with jitter, forever;
``book_channels`` and :func:`failing_channels` tell ``/readyz`` and the metrics which channels
fail. Once a channel fails in a pass, its other alerts of that pass are not tried (a dead robot
with a 10 s timeout would stall every other channel) but put back with their own backoff. An
alert whose channel is no longer configured stays unsent, logged once per channel and looked at
again every hour (each look counts as an attempt), until the channel comes back.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import logging
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, quote_plus, urlsplit

import httpx
import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from sqlalchemy import Engine

from core.playbook import Playbook, load_playbook, percent_text
from live.book import (
    ChannelHealth,
    DueAlert,
    channel_health,
    due_alerts,
    iso_time,
    mark_alert_failed,
    mark_alert_sent,
    record_channel,
)

logger = logging.getLogger(__name__)

SETTING = "CANCEL_RISK_ALERT_CHANNELS"
EVENT = "cancel_risk.alert"
# Where the service shows a posting, appended to its public address.
POSTING_PATH = "/v1/postings/{posting_number}"
TELEGRAM_API = "https://api.telegram.org"
SIGNATURE_HEADER = "X-Cancel-Risk-Signature"
USER_AGENT = "ozon-cancel-risk-alerts/1"

FIRST_RETRY_SECONDS = 10.0
MAX_RETRY_SECONDS = 3600.0
# A retry comes up to this fraction earlier than its nominal delay: alerts that failed together
# (a robot down for a while) do not all come back in the same second.
DEFAULT_JITTER = 0.25
DEFAULT_TIMEOUT_SECONDS = 10.0

MAX_REASONS = 3
MAX_FACTS_CHARS = 200
MAX_ACTION_CHARS = 200
WECOM_MAX_BYTES = 4096
ERROR_SNIPPET_CHARS = 300

ChannelKind = Literal["webhook", "wecom", "feishu", "dingtalk", "telegram"]
Lang = Literal["zh", "ru", "en"]

DEFAULT_LANG: dict[str, str] = {
    "webhook": "en",
    "wecom": "zh",
    "feishu": "zh",
    "dingtalk": "zh",
    "telegram": "ru",
}
_URL_KINDS = frozenset({"webhook", "wecom", "feishu", "dingtalk"})
_SECRET_KINDS = frozenset({"webhook", "feishu", "dingtalk"})
_RESERVED_HEADERS = frozenset(
    {"content-type", "content-length", "host", "transfer-encoding", SIGNATURE_HEADER.lower()}
)
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


# --- configuration --------------------------------------------------------------------------------


def _problem(field: str, why: str) -> PydanticCustomError:
    """A cross-field problem that still names its field in :func:`parse_channels`' message."""
    return PydanticCustomError("channel_field", "{field}: {why}", {"field": field, "why": why})


class ChannelConfig(BaseModel):
    """One alert channel, as an item of ``CANCEL_RISK_ALERT_CHANNELS`` describes it.

    Fields that do not apply to the kind (a ``token`` on a WeCom robot) are refused rather than
    ignored: a misplaced credential is a mistake the operator wants to hear about at start-up.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128)
    kind: ChannelKind
    url: SecretStr | None = Field(None, description="The robot's or the webhook's address.")
    lang: Lang
    secret: SecretStr | None = Field(None, description="Signing key (Feishu, DingTalk, webhook).")
    token: SecretStr | None = Field(None, description="The Telegram bot's token.")
    chat_id: str | None = Field(None, min_length=1, description="The Telegram chat.")
    api_base: str = Field(TELEGRAM_API, description="The Telegram Bot API's address.")
    headers: dict[str, SecretStr] = Field(default_factory=dict, description="Webhook only.")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            data = dict(data)
            kind = data.get("kind")
            if isinstance(kind, str):
                data.setdefault("name", kind)
                if kind in DEFAULT_LANG:
                    data.setdefault("lang", DEFAULT_LANG[kind])
        return data

    @field_validator("name")
    @classmethod
    def _strip_name(cls, value: str) -> str:
        if value != value.strip() or not value.isprintable():
            raise ValueError("must not start or end with spaces, nor hold control characters")
        return value

    @field_validator("chat_id", mode="before")
    @classmethod
    def _chat_id_text(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return value

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _check_http_url(value.get_secret_value())
        return value

    @field_validator("api_base")
    @classmethod
    def _http_base(cls, value: str) -> str:
        _check_http_url(value)
        return value.rstrip("/")

    @field_validator("headers")
    @classmethod
    def _header_names(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for header, content in value.items():
            if not _HEADER_NAME.match(header):
                raise ValueError(f"{header!r} is not a header name")
            if header.lower() in _RESERVED_HEADERS:
                raise ValueError(f"{header!r} is set by the sender itself")
            if any(c in content.get_secret_value() for c in "\r\n"):
                raise ValueError(f"the value of {header!r} holds a line break")
        return value

    @model_validator(mode="after")
    def _fits_kind(self) -> ChannelConfig:
        kind = self.kind
        if kind in _URL_KINDS and self.url is None:
            raise _problem("url", f"required for a {kind} channel")
        if kind == "telegram":
            if self.url is not None:
                raise _problem("url", "not used by a telegram channel (give token and chat_id)")
            if self.token is None:
                raise _problem("token", "required for a telegram channel (the bot's token)")
            if not re.fullmatch(r"\d+:[A-Za-z0-9_-]+", self.token.get_secret_value()):
                raise _problem("token", "not a bot token (digits, a colon, then the key)")
            if self.chat_id is None:
                raise _problem("chat_id", "required for a telegram channel")
        else:
            for field in ("token", "chat_id", "api_base"):
                if field in self.model_fields_set:
                    raise _problem(field, f"applies to telegram channels only, not {kind}")
        if self.secret is not None and kind not in _SECRET_KINDS:
            raise _problem("secret", f"a {kind} channel does not sign its messages")
        if self.secret is not None and not self.secret.get_secret_value():
            raise _problem("secret", "is empty")
        if self.headers and kind != "webhook":
            raise _problem("headers", f"applies to webhook channels only, not {kind}")
        return self

    @property
    def display_url(self) -> str:
        """The address without its credential (scheme and host), for logs."""
        raw = self.api_base if self.kind == "telegram" else self.raw_url()
        parts = urlsplit(raw)
        return f"{parts.scheme}://{parts.netloc}/…"

    def raw_url(self) -> str:
        """The address with its credential: for the request only, never for a log."""
        return "" if self.url is None else self.url.get_secret_value()

    def secret_texts(self) -> list[str]:
        """Every credential this channel holds, longest first (to scrub them from errors)."""
        texts: list[str] = []
        if self.url is not None:
            raw = self.url.get_secret_value()
            parts = urlsplit(raw)
            texts.append(raw)
            texts.extend(value for _, value in parse_qsl(parts.query))
            # A hook id in the path (Feishu's) is the credential itself.
            texts.extend(segment for segment in parts.path.split("/") if len(segment) >= 16)
        for secret in (self.secret, self.token, *self.headers.values()):
            if secret is not None:
                texts.append(secret.get_secret_value())
        return sorted({text for text in texts if len(text) >= 4}, key=len, reverse=True)


def _check_http_url(value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// address")


def _describe(error: Mapping[str, Any]) -> tuple[str, str]:
    """A validation error as (field, why)."""
    if error["type"] == "channel_field":
        return str(error["ctx"]["field"]), str(error["ctx"]["why"])
    field = ".".join(str(part) for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "not a channel field"
    return field, message


def parse_channels(text: str) -> list[ChannelConfig]:
    """The channels ``CANCEL_RISK_ALERT_CHANNELS`` holds (empty text: none).

    Names default to the kind, then ``kind-2``, ``kind-3``, ... (skipping names given
    explicitly). Raises ``ValueError`` naming the variable, the item's index, the field and
    why; a message never quotes a URL, a secret or a token.
    """
    if not text.strip():
        return []
    try:
        items = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{SETTING} is not valid JSON: {exc}") from None
    if not isinstance(items, list):
        raise ValueError(f"{SETTING} must be a JSON list of channel objects")
    explicit = [
        item["name"]
        for item in items
        if isinstance(item, dict) and isinstance(item.get("name"), str)
    ]
    taken: set[str] = set(explicit)
    problems: list[str] = []
    channels: list[ChannelConfig] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        where = f"{SETTING}[{index}]"
        if not isinstance(item, dict):
            problems.append(f"{where}: must be an object, not {type(item).__name__}")
            continue
        item = dict(item)
        kind = item.get("kind")
        if "name" not in item and isinstance(kind, str):
            item["name"] = _free_name(kind, taken)
            taken.add(item["name"])
        try:
            channel = ChannelConfig.model_validate(item)
        except ValidationError as exc:
            for error in exc.errors():
                field, why = _describe(error)
                problems.append(f"{where}.{field}: {why}" if field else f"{where}: {why}")
            continue
        if channel.name in seen:
            problems.append(f"{where}.name: {channel.name!r} is already the name of a channel")
            continue
        seen.add(channel.name)
        channels.append(channel)
    if problems:
        raise ValueError("; ".join(problems))
    return channels


def _free_name(kind: str, taken: set[str]) -> str:
    if kind not in taken:
        return kind
    number = 2
    while f"{kind}-{number}" in taken:
        number += 1
    return f"{kind}-{number}"


# --- messages -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutgoingRequest:
    """An HTTP POST to make. Its repr shows the host only: the URL and headers hold secrets."""

    url: str
    headers: dict[str, str]
    body: bytes

    def __repr__(self) -> str:
        parts = urlsplit(self.url)
        return f"OutgoingRequest(host={parts.netloc!r}, body_bytes={len(self.body)})"


_LEVELS: dict[str, dict[str, str]] = {
    "zh": {"high": "高", "medium": "中", "low": "低"},
    "ru": {"high": "высокий", "medium": "средний", "low": "низкий"},
    "en": {"high": "high", "medium": "medium", "low": "low"},
}

_WORDS: dict[str, dict[str, str]] = {
    "zh": {
        "heading": "订单取消风险：{level}",
        "posting": "货件号",
        "probability": "取消概率",
        "as_of": "评估时间",
        "reasons": "主要原因",
        "share": "占风险 {share}",
        "action": "建议操作",
        "link": "查看详情",
        "sep": "：",
    },
    "ru": {
        "heading": "Риск отмены заказа: {level}",
        "posting": "Отправление",
        "probability": "Вероятность отмены",
        "as_of": "Оценка на",
        "reasons": "Причины",
        "share": "доля риска {share}",
        "action": "Что сделать",
        "link": "Подробнее",
        "sep": ": ",
    },
    "en": {
        "heading": "Cancellation risk: {level}",
        "posting": "Posting",
        "probability": "Cancellation probability",
        "as_of": "As of",
        "reasons": "Reasons",
        "share": "{share} of the risk",
        "action": "Next step",
        "link": "Details",
        "sep": ": ",
    },
}


@dataclass(frozen=True)
class ReasonLine:
    code: str
    title: str
    share: float
    facts: str


@dataclass(frozen=True)
class AlertMessage:
    """What every format says about an alert, in one language, before any markup."""

    lang: str
    level: str  # the risk level's code: low, medium, high
    heading: str
    posting_number: str
    probability: str
    as_of: str
    reasons: tuple[ReasonLine, ...]
    action: str | None
    link: str | None

    def word(self, key: str, **values: str) -> str:
        return _WORDS[self.lang][key].format(**values)

    def field(self, key: str, value: str) -> str:
        """``label: value`` with the language's separator (a full-width colon in Chinese)."""
        return f"{self.word(key)}{self.word('sep')}{value}"

    def reason_text(self, reason: ReasonLine) -> str:
        share = self.word("share", share=percent(reason.share, self.lang))
        open_, close = ("（", "）") if self.lang == "zh" else (" (", ")")
        facts = f"{self.word('sep')}{reason.facts}" if reason.facts else ""
        return f"{reason.title}{open_}{share}{close}{facts}"


def percent(value: float, lang: str) -> str:
    """``83%``; Russian puts a space before the sign (``83 %``), as the playbook does; never
    0 % or 100 % for a probability between them (:func:`core.playbook.percent_text`)."""
    return percent_text(value, space=" " if lang == "ru" else "")


def _human_time(ns: int) -> str:
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ns // 1000)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _clip(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def posting_url(public_url: str | None, posting_number: str) -> str | None:
    """The posting's page on the service, if the service has a public address."""
    if not public_url:
        return None
    path = POSTING_PATH.format(posting_number=quote(posting_number, safe=""))
    return public_url.rstrip("/") + path


def _explanation(alert: DueAlert, lang: str) -> dict[str, Any]:
    held = alert.explanations.get(lang) or alert.explanations.get("en") or {}
    return held if isinstance(held, dict) else {}


def _title(playbook: Playbook, code: str, lang: str) -> str:
    try:
        return playbook.entry(code).title.get(lang)
    except KeyError:  # a code of a newer model than this playbook knows
        return code


def build_message(
    alert: DueAlert, lang: str, public_url: str | None, playbook: Playbook | None = None
) -> AlertMessage:
    """The alert's content in ``lang``: its score's top reasons with the playbook's titles."""
    playbook = playbook or load_playbook()
    explanation = _explanation(alert, lang)
    reasons = tuple(
        ReasonLine(
            code=str(reason.get("code")),
            title=_title(playbook, str(reason.get("code")), lang),
            share=float(reason.get("share") or 0.0),
            facts=_clip(reason.get("facts") or "", MAX_FACTS_CHARS),
        )
        for reason in (explanation.get("reasons") or [])[:MAX_REASONS]
        if isinstance(reason, dict)
    )
    actions = explanation.get("actions") or []
    level = _LEVELS[lang].get(alert.risk_level, alert.risk_level)
    return AlertMessage(
        lang=lang,
        level=alert.risk_level,
        heading=_WORDS[lang]["heading"].format(level=level),
        posting_number=alert.posting_number,
        probability=percent(alert.probability, lang),
        as_of=_human_time(alert.as_of),
        reasons=reasons,
        action=_clip(actions[0], MAX_ACTION_CHARS) if actions else None,
        link=posting_url(public_url, alert.posting_number),
    )


def webhook_payload(
    alert: DueAlert, lang: str, public_url: str | None, playbook: Playbook | None = None
) -> dict[str, Any]:
    """The generic webhook's JSON object, keys as documented here.

    ``event`` ("cancel_risk.alert"), ``alert_id`` (the same for every retry: deduplicate on
    it), ``posting_number``, ``alert_key`` (``high``, or ``rise:0.60`` for a step alert),
    ``level``, ``probability`` (0 to 1), ``as_of`` (ISO-8601 UTC), ``lang``, ``reasons``
    (``code``, ``title``, ``share`` of the risk, ``facts``; in ``lang``), ``actions``,
    ``decision`` (``ship``, ``contact_buyer``, ``hold_and_confirm``), ``expected_saving`` and
    ``url`` (the posting on the service; null without a public address).
    """
    playbook = playbook or load_playbook()
    explanation = _explanation(alert, lang)
    return {
        "event": EVENT,
        "alert_id": alert.id,
        "posting_number": alert.posting_number,
        "alert_key": alert.alert_key,
        "level": alert.risk_level,
        "probability": alert.probability,
        "as_of": iso_time(alert.as_of),
        "lang": lang,
        "reasons": [
            {
                "code": reason.get("code"),
                "title": _title(playbook, str(reason.get("code")), lang),
                "share": reason.get("share"),
                "facts": reason.get("facts"),
            }
            for reason in explanation.get("reasons") or []
            if isinstance(reason, dict)
        ],
        "actions": list(explanation.get("actions") or []),
        "decision": explanation.get("decision"),
        "expected_saving": explanation.get("expected_saving"),
        "url": posting_url(public_url, alert.posting_number),
    }


def _wecom_markdown(message: AlertMessage) -> str:
    # WeCom colours three ways only: "warning" (orange-red), "info" (green), "comment" (grey).
    colour = "warning" if message.level == "high" else "comment"
    probability = f'<font color="{colour}">{message.probability}</font>'
    lines = [
        f"## {message.heading}",
        f"> {message.field('posting', f'**{message.posting_number}**')}",
        f"> {message.field('probability', probability)}",
        f"> {message.field('as_of', message.as_of)}",
    ]
    lines.extend(_markdown_body(message))
    return _fit_bytes("\n".join(lines), WECOM_MAX_BYTES)


def _markdown_body(message: AlertMessage) -> list[str]:
    """The reasons, the action and the link, in the markdown WeCom and DingTalk share."""
    lines = []
    if message.reasons:
        lines.append(f"**{message.word('reasons')}**")
        lines.extend(
            f"{number}. {message.reason_text(reason)}"
            for number, reason in enumerate(message.reasons, 1)
        )
    if message.action:
        lines.append(f"**{message.word('action')}**{message.word('sep')}{message.action}")
    if message.link:
        lines.append(f"[{message.word('link')}]({message.link})")
    return lines


def _fit_bytes(text: str, limit: int) -> str:
    encoded = text.encode()
    if len(encoded) <= limit:
        return text
    return encoded[: limit - len("…".encode())].decode(errors="ignore") + "…"


def _dingtalk_markdown(message: AlertMessage) -> str:
    lines = [
        f"### {message.heading}",
        message.field("posting", f"**{message.posting_number}**"),
        message.field("probability", f"**{message.probability}**"),
        message.field("as_of", message.as_of),
        *_markdown_body(message),
    ]
    # DingTalk's markdown joins single line breaks: each line is a paragraph of its own.
    return "\n\n".join(lines)


def _feishu_post(message: AlertMessage) -> dict[str, Any]:
    def text(value: str) -> list[dict[str, str]]:
        return [{"tag": "text", "text": value}]

    rows = [
        text(message.field("posting", message.posting_number)),
        text(message.field("probability", message.probability)),
        text(message.field("as_of", message.as_of)),
    ]
    if message.reasons:
        rows.append(text(message.word("reasons")))
        rows.extend(
            text(f"{number}. {message.reason_text(reason)}")
            for number, reason in enumerate(message.reasons, 1)
        )
    if message.action:
        rows.append(text(message.field("action", message.action)))
    if message.link:
        rows.append([{"tag": "a", "text": message.word("link"), "href": message.link}])
    # A post carries its texts per client language; Feishu has no Russian key, and shows the
    # one language given to every reader.
    locale = "zh_cn" if message.lang == "zh" else "en_us"
    return {"post": {locale: {"title": message.heading, "content": rows}}}


def _telegram_html(message: AlertMessage) -> str:
    """Telegram's HTML: every quoted text escaped (a stray ``<`` or ``&`` fails the message)."""

    def esc(value: str) -> str:
        return html.escape(value, quote=False)

    def label(key: str) -> str:
        return esc(message.word(key) + message.word("sep"))

    lines = [
        f"<b>{esc(message.heading)}</b>",
        f"{label('posting')}<code>{esc(message.posting_number)}</code>",
        f"{label('probability')}<b>{esc(message.probability)}</b>",
        f"{label('as_of')}{esc(message.as_of)}",
    ]
    if message.reasons:
        lines += ["", f"<b>{esc(message.word('reasons'))}</b>"]
        lines.extend(
            f"{number}. {esc(message.reason_text(reason))}"
            for number, reason in enumerate(message.reasons, 1)
        )
    if message.action:
        lines += ["", f"<b>{label('action')}</b>{esc(message.action)}"]
    if message.link:
        href = html.escape(message.link, quote=True)
        lines.append(f'<a href="{href}">{esc(message.word("link"))}</a>')
    return "\n".join(lines)


def _json(value: Any) -> bytes:
    return orjson.dumps(value)


def _hmac_b64(key: bytes, message: bytes) -> str:
    return base64.b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode()


def feishu_sign(secret: str, timestamp_seconds: int) -> str:
    """Feishu's robot signature: HMAC-SHA256 keyed by "timestamp\\nsecret" over nothing."""
    return _hmac_b64(f"{timestamp_seconds}\n{secret}".encode(), b"")


def dingtalk_sign(secret: str, timestamp_ms: int) -> str:
    """DingTalk's robot signature, before URL-encoding: HMAC-SHA256 of "timestamp\\nsecret"."""
    return _hmac_b64(secret.encode(), f"{timestamp_ms}\n{secret}".encode())


def webhook_signature(secret: str, body: bytes) -> str:
    """The ``X-Cancel-Risk-Signature`` value: ``sha256=`` and the body's HMAC-SHA256 in hex."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def render(
    channel: ChannelConfig,
    alert: DueAlert,
    public_url: str | None,
    *,
    signed_at_ns: int | None = None,
    playbook: Playbook | None = None,
) -> OutgoingRequest:
    """The request that tells ``channel`` about ``alert``, in the vendor's format.

    Pure but for the clock: Feishu and DingTalk sign a timestamp, which they refuse more than
    an hour off, so ``signed_at_ns`` must be the wall clock (omitted: read here).
    """
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
    url = channel.raw_url()
    secret = None if channel.secret is None else channel.secret.get_secret_value()
    if channel.kind in ("feishu", "dingtalk") and secret is not None and signed_at_ns is None:
        signed_at_ns = time.time_ns()
    if channel.kind == "webhook":
        body = _json(webhook_payload(alert, channel.lang, public_url, playbook))
        headers.update({name: value.get_secret_value() for name, value in channel.headers.items()})
        if secret is not None:
            headers[SIGNATURE_HEADER] = webhook_signature(secret, body)
        return OutgoingRequest(url, headers, body)
    message = build_message(alert, channel.lang, public_url, playbook)
    if channel.kind == "wecom":
        payload: dict[str, Any] = {
            "msgtype": "markdown",
            "markdown": {"content": _wecom_markdown(message)},
        }
    elif channel.kind == "feishu":
        payload = {}
        if secret is not None:
            assert signed_at_ns is not None
            seconds = signed_at_ns // 1_000_000_000
            payload.update(timestamp=str(seconds), sign=feishu_sign(secret, seconds))
        payload.update(msg_type="post", content=_feishu_post(message))
    elif channel.kind == "dingtalk":
        payload = {
            "msgtype": "markdown",
            "markdown": {
                "title": f"{message.heading} {message.posting_number}",
                "text": _dingtalk_markdown(message),
            },
        }
        if secret is not None:
            assert signed_at_ns is not None
            millis = signed_at_ns // 1_000_000
            separator = "&" if urlsplit(url).query else ("" if url.endswith("?") else "?")
            url += f"{separator}timestamp={millis}&sign={quote_plus(dingtalk_sign(secret, millis))}"
    else:  # telegram
        assert channel.token is not None
        url = f"{channel.api_base}/bot{channel.token.get_secret_value()}/sendMessage"
        payload = {
            "chat_id": channel.chat_id,
            "text": _telegram_html(message),
            "parse_mode": "HTML",
        }
    return OutgoingRequest(url, headers, _json(payload))


def _snippet(body: bytes) -> str:
    return _clip(body.decode("utf-8", errors="replace"), ERROR_SNIPPET_CHARS)


def _http_error(status_code: int, body: bytes) -> str:
    snippet = _snippet(body)
    return f"HTTP {status_code}: {snippet}" if snippet else f"HTTP {status_code}"


def _vendor_error(kind: str, answer: Mapping[str, Any]) -> str | None:
    """None if the vendor's answer says the message was taken, else its code and message."""
    if kind == "telegram":
        if answer.get("ok") is True:
            return None
        return f"error_code {answer.get('error_code')}: {answer.get('description')}"
    if kind == "feishu":  # older robots answer StatusCode/StatusMessage only
        code = answer.get("code", answer.get("StatusCode"))
        text = answer.get("msg", answer.get("StatusMessage"))
        label = "code"
    else:
        code, text, label = answer.get("errcode"), answer.get("errmsg"), "errcode"
    if code == 0:
        return None
    if code is None:
        return f"no {label} in the answer: {_snippet(orjson.dumps(answer))}"
    return f"{label} {code}: {text}"


def check_response(channel: ChannelConfig, status_code: int, body: bytes) -> str | None:
    """None if the vendor took the message, else why not (HTTP status, the vendor's code).

    The robots answer a refused message (a bad signature, a rate limit, a missing keyword) with
    HTTP 200 and an error code in the body, so the body decides for every kind but the plain
    webhook, for which any 2xx is a delivery.
    """
    http_ok = 200 <= status_code < 300
    if channel.kind == "webhook":
        return None if http_ok else _http_error(status_code, body)
    try:
        answer = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        return f"unexpected answer: {_snippet(body)}" if http_ok else _http_error(status_code, body)
    vendor = _vendor_error(channel.kind, answer)
    if vendor is None:
        return None if http_ok else _http_error(status_code, body)
    return vendor if http_ok else f"HTTP {status_code}; {vendor}"


# --- sending --------------------------------------------------------------------------------------


def retry_delay_seconds(
    failures: int, *, jitter: float = 0.0, rng: random.Random | None = None
) -> float:
    """How long to wait after the ``failures``-th failed attempt in a row (1, 2, ...).

    10 s, doubling, at most an hour; with ``jitter`` j, up to j of the delay earlier (drawn
    from ``rng``), so the delay never exceeds the cap and still grows while below it.
    """
    exponent = min(max(failures, 1) - 1, 32)  # 2**32 * 10 s is far past the cap already
    delay = min(MAX_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2.0**exponent)
    if jitter > 0:
        delay *= 1.0 - jitter * (rng or random).random()
    return delay


@dataclass(frozen=True)
class SendReport:
    """What one pass did: alerts delivered, failed (or put back after their channel failed),
    and left for a channel no longer configured."""

    sent: int = 0
    failed: int = 0
    unconfigured: int = 0


class AlertSender:
    """Sends the outbox's due alerts to the configured channels (see the module's docstring).

    ``now_ns`` is the wall clock in UTC nanoseconds: it dates the outbox's attempts and the
    robots' signatures, which Feishu and DingTalk refuse more than an hour off. ``client`` is
    created (and closed by :meth:`close`) when not given. ``jitter`` 0 makes retries exactly
    10 s, 20 s, ...; ``rng`` draws the jitter otherwise.
    """

    def __init__(
        self,
        engine: Engine,
        channels: Sequence[ChannelConfig],
        public_url: str | None = None,
        now_ns: Callable[[], int] = time.time_ns,
        client: httpx.Client | None = None,
        *,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        jitter: float = DEFAULT_JITTER,
        rng: random.Random | None = None,
        playbook: Playbook | None = None,
    ) -> None:
        if not 0 <= jitter < 1:
            raise ValueError("jitter must be at least 0 and below 1")
        names = [channel.name for channel in channels]
        if len(set(names)) != len(names):
            raise ValueError(f"alert channel names must be unique: {names}")
        self.engine = engine
        self.channels = {channel.name: channel for channel in channels}
        self.public_url = public_url
        self.now_ns = now_ns
        self.timeout_seconds = timeout_seconds
        self.jitter = jitter
        self.rng = rng or random.Random()  # noqa: S311 - spreading retries, not secrecy
        self.playbook = playbook or load_playbook()
        self._owns_client = client is None
        self.client = client or httpx.Client(timeout=timeout_seconds, follow_redirects=False)
        self._reported_unconfigured: set[str] = set()
        # httpx logs every request's full URL at INFO: a robot's key, a bot's token.
        self._redact = RedactSecrets(channels)
        logging.getLogger("httpx").addFilter(self._redact)

    def close(self) -> None:
        logging.getLogger("httpx").removeFilter(self._redact)
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> AlertSender:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def send_due(self, limit: int = 100) -> SendReport:
        """One pass: send up to ``limit`` due alerts, each outcome committed right after it."""
        with self.engine.begin() as connection:
            due = due_alerts(connection, self.now_ns(), limit)
        sent = failed = unconfigured = 0
        failed_now: dict[str, str] = {}  # channel -> its error in this pass
        for alert in due:
            channel = self.channels.get(alert.channel)
            if channel is None:
                self._put_aside(alert)
                unconfigured += 1
                continue
            if channel.name in failed_now:
                error = f"not tried: the channel failed in this pass ({failed_now[channel.name]})"
                self._record(alert, channel, error, tried=False)
                failed += 1
                continue
            error, tried = self._deliver(channel, alert)
            self._record(alert, channel, error, tried=tried)
            if error is None:
                sent += 1
            else:
                if tried:
                    failed_now[channel.name] = error
                failed += 1
        return SendReport(sent, failed, unconfigured)

    def _deliver(self, channel: ChannelConfig, alert: DueAlert) -> tuple[str | None, bool]:
        """Send one alert: the error (None: delivered; credentials scrubbed), and whether the
        channel was tried (an alert that cannot be rendered says nothing about its channel)."""
        try:
            request = render(
                channel,
                alert,
                self.public_url,
                signed_at_ns=self.now_ns(),
                playbook=self.playbook,
            )
        except Exception as exc:  # a malformed stored score must not stop the other alerts
            logger.exception("alert %d cannot be rendered for channel %s", alert.id, channel.name)
            return _scrub(f"cannot render the alert: {type(exc).__name__}: {exc}", channel), False
        try:
            response = self.client.post(
                request.url,
                content=request.body,
                headers=request.headers,
                timeout=self.timeout_seconds,
            )
        except httpx.HTTPError as exc:
            return _scrub(f"{type(exc).__name__}: {exc}".rstrip(": "), channel), True
        error = check_response(channel, response.status_code, response.content)
        return (None if error is None else _scrub(error, channel)), True

    def _record(
        self, alert: DueAlert, channel: ChannelConfig, error: str | None, *, tried: bool
    ) -> None:
        at = self.now_ns()
        with self.engine.begin() as connection:
            if error is None:
                mark_alert_sent(connection, alert.id, at)
            else:
                delay = retry_delay_seconds(alert.attempts + 1, jitter=self.jitter, rng=self.rng)
                mark_alert_failed(connection, alert.id, error, at + int(delay * 1e9))
            if tried:
                record_channel(connection, channel.name, at, error)
        if error is None:
            logger.info(
                "alert %d (posting %s, %s) sent to %s",
                alert.id,
                alert.posting_number,
                alert.alert_key,
                channel.name,
            )
        else:
            logger.warning(
                "alert %d (posting %s) to %s (%s) failed, attempt %d: %s; retried later",
                alert.id,
                alert.posting_number,
                channel.name,
                channel.display_url,
                alert.attempts + 1,
                error,
            )

    def _put_aside(self, alert: DueAlert) -> None:
        """An alert for a channel no longer configured: unsent, looked at again in an hour."""
        at = self.now_ns()
        error = f"channel {alert.channel!r} is not configured"
        with self.engine.begin() as connection:
            mark_alert_failed(connection, alert.id, error, at + int(MAX_RETRY_SECONDS * 1e9))
        if alert.channel not in self._reported_unconfigured:
            self._reported_unconfigured.add(alert.channel)
            logger.warning(
                "alerts for channel %r stay unsent: it is not in %s (configured: %s)",
                alert.channel,
                SETTING,
                ", ".join(sorted(self.channels)) or "none",
            )


def _scrub(text: str, channel: ChannelConfig) -> str:
    for secret in channel.secret_texts():
        text = text.replace(secret, "***")
    return text


class RedactSecrets(logging.Filter):
    """Replaces the channels' credentials in a log record's message by ``***``."""

    def __init__(self, channels: Sequence[ChannelConfig]) -> None:
        super().__init__()
        texts = {text for channel in channels for text in channel.secret_texts()}
        self.secrets = sorted(texts, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        scrubbed = message
        for secret in self.secrets:
            scrubbed = scrubbed.replace(secret, "***")
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        return True


def failing_channels(engine: Engine, channels: Sequence[ChannelConfig]) -> list[ChannelHealth]:
    """The configured channels whose latest delivery failed (for ``/readyz`` and metrics)."""
    with engine.connect() as connection:
        health = channel_health(connection, [channel.name for channel in channels])
    return [entry for entry in health if entry.failing]
