"""API keys and the request-size limit.

Keys come from the settings (``CANCEL_RISK_API_KEYS``, ``CANCEL_RISK_ADMIN_KEY``) and are sent
as ``X-API-Key``. Only SHA-256 digests of the keys are kept, and a presented key is compared
with every one of them with ``hmac.compare_digest``, so neither the content nor the length of a
key leaks through timing. No key (or an unknown one) is 401; a scoring key on an admin route is
403. The admin key may also score. Keys are never logged: nothing here logs a header.
"""

from __future__ import annotations

import hashlib
import hmac
from enum import StrEnum
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyHeader
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.settings import ServiceSettings

API_KEY_HEADER = "X-API-Key"
_api_key_header = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description="A scoring key from CANCEL_RISK_API_KEYS, or the admin key.",
)


class KeyScope(StrEnum):
    SCORE = "score"
    ADMIN = "admin"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class KeyRing:
    """The digests of the configured keys and the scopes they grant."""

    def __init__(self, settings: ServiceSettings) -> None:
        self._keys: list[tuple[bytes, KeyScope]] = [
            (_digest(key.get_secret_value()), KeyScope.SCORE) for key in settings.api_keys
        ]
        if settings.admin_key is not None:
            self._keys.append((_digest(settings.admin_key.get_secret_value()), KeyScope.ADMIN))

    def scope_of(self, presented: str | None) -> KeyScope | None:
        """The scope of a presented key (admin wins), or None; the same work for every key."""
        if not presented:
            return None
        candidate = _digest(presented)
        found: KeyScope | None = None
        for digest, scope in self._keys:
            if hmac.compare_digest(candidate, digest) and found is not KeyScope.ADMIN:
                found = scope
        return found

    def session_id(self, presented: str | None) -> str | None:
        """The dashboard's id of a valid key (a digest of its digest: the key cannot be read
        back from it), or None for a key that is not valid."""
        if self.scope_of(presented) is None:
            return None
        return _session_id(_digest(presented or ""))

    def knows_session_id(self, session_id: str) -> bool:
        """Whether a configured key has this dashboard id."""
        known = False
        for digest, _ in self._keys:
            known |= hmac.compare_digest(_session_id(digest), session_id)
        return known


def _session_id(digest: bytes) -> str:
    return hashlib.sha256(b"cancel-risk-ui-session:" + digest).hexdigest()[:32]


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=message,
        headers={"WWW-Authenticate": API_KEY_HEADER},
    )


def _scope(request: Request, presented: str | None) -> KeyScope:
    keys: KeyRing = request.app.state.keys
    if not presented:
        raise _unauthorized(f"an API key is required in the {API_KEY_HEADER} header")
    scope = keys.scope_of(presented)
    if scope is None:
        raise _unauthorized("the API key is not valid")
    return scope


async def require_scoring_key(
    request: Request, presented: Annotated[str | None, Depends(_api_key_header)]
) -> KeyScope:
    """Any valid key (scoring or admin)."""
    return _scope(request, presented)


async def require_admin_key(
    request: Request, presented: Annotated[str | None, Depends(_api_key_header)]
) -> KeyScope:
    """The admin key only; a valid scoring key gets 403."""
    scope = _scope(request, presented)
    if scope is not KeyScope.ADMIN:
        raise HTTPException(
            status_code=status.HTTP_403_FORBIDDEN, detail="this route needs the admin key"
        )
    return scope


ScoringKeyDep = Annotated[KeyScope, Depends(require_scoring_key)]
AdminKeyDep = Annotated[KeyScope, Depends(require_admin_key)]


class BodySizeLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with 413, before the application reads them.

    A declared ``Content-Length`` over the limit is refused at once; a chunked body is counted
    as it arrives and refused as soon as it passes the limit (the application then sees a
    disconnected client and its own response is dropped).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await self._refuse(send)
                    return
        received = 0
        refused = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counting_receive, guarded_send)

    async def _refuse(self, send: Send) -> None:
        body = (
            b'{"detail":"the request body is larger than the limit of '
            + str(self.max_bytes).encode()
            + b' bytes"}'
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
