"""The live mode on the demo shop: the service switched on, the last days replayed, the alerts.

``python -m cancel_risk.live_demo --history data/demo/history --db data/demo/book.db`` starts
``cancel-risk serve --live`` on a free loopback port (the champion from the registry, the book's
clock following the replayed records), with two alert channels, generic JSON webhooks in Chinese
and in English, pointed at an inbox served here (:class:`AlertInbox`). It then replays the
history as Ozon and the seller's poller would have sent it (``cancel-risk replay``): the orders
still open ``--days`` before the export, with everything known of them so far, at once (the
seller switching the service on), then those days at ``--speed``. It waits until every posting
is re-scored and every alert delivered, prints the alerts and where to look, and stops the
service. ``make demo`` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from core.playbook import percent_text

CLI = Path(sys.executable).with_name("cancel-risk")
KEY = "demo-key"
ADMIN = "demo-admin-key"
START_TIMEOUT_S = 180


@dataclass
class AlertInbox:
    """A loopback HTTP server keeping the JSON bodies of the alerts POSTed to it.

    ``failing`` makes it answer 500 (an unavailable channel); the tests use that.
    """

    received: list[dict[str, Any]] = field(default_factory=list)
    failing: bool = False
    server: ThreadingHTTPServer | None = None

    def url(self, path: str = "/alerts") -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def start(self) -> AlertInbox:
        inbox = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if inbox.failing:
                    self.send_response(500)
                    self.end_headers()
                    return
                inbox.received.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def webhook(self, name: str = "inbox", lang: str = "en") -> dict[str, str]:
        """An alert channel (``CANCEL_RISK_ALERT_CHANNELS`` item) delivering here."""
        return {"kind": "webhook", "name": name, "url": self.url(f"/{name}"), "lang": lang}


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def live_service(db: Path, channels: list[dict[str, str]], log: Path) -> Iterator[str]:
    """``cancel-risk serve --live`` on a free loopback port until the block ends."""
    port = _free_port()
    env = {
        **os.environ,
        "CANCEL_RISK_API_KEYS": KEY,
        "CANCEL_RISK_ADMIN_KEY": ADMIN,
        "CANCEL_RISK_CLOCK": "events",
        # The replay runs two days in seconds: the dashboard's causes every 12 replayed hours.
        "CANCEL_RISK_CAUSES_SECONDS": str(12 * 3600),
        "CANCEL_RISK_ALERT_CHANNELS": json.dumps(channels),
        "CANCEL_RISK_PUBLIC_URL": f"http://127.0.0.1:{port}",
    }
    command = [str(CLI), "serve", "--port", str(port), "--db", f"sqlite:///{db.resolve()}"]
    with log.open("wb") as output:
        process = subprocess.Popen(  # noqa: S603 (our own command)
            command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise SystemExit(f"the service exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the service was not ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_idle(client: httpx.Client, timeout: float = 300.0) -> dict[str, Any]:
    """The book's status once nothing waits for re-scoring or delivery."""
    deadline = time.monotonic() + timeout
    while True:
        status = client.get("/v1/live/status").raise_for_status().json()
        if status["pending"] == 0 and status["alerts_unsent"] == 0:
            return status
        if time.monotonic() > deadline:
            raise SystemExit(f"the book did not settle in {timeout:.0f} s: {status}")
        time.sleep(0.5)


def _export_moment(history: Path) -> datetime:
    from cancel_risk.examples import latest_moment, load_history_records

    ns = latest_moment(load_history_records(history))
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ns // 1000)


def _alert_line(alert: dict[str, Any]) -> str:
    reason = alert["reasons"][0] if alert["reasons"] else None
    why = f"{reason['title']}: {reason['facts']}" if reason else "-"
    action = alert["actions"][0] if alert["actions"] else "-"
    shown = percent_text(alert["probability"], space="")
    return f"  {alert['posting_number']}  {shown} {alert['level']:<6}  {why}  -> {action}"


def run(args: argparse.Namespace) -> None:
    history = Path(args.history)
    db = Path(args.db)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    db.parent.mkdir(parents=True, exist_ok=True)
    export = _export_moment(history)
    since = export - timedelta(days=args.days)
    inbox = AlertInbox().start()
    channels = [inbox.webhook("zh", "zh"), inbox.webhook("en", "en")]
    try:
        with live_service(db, channels, db.with_suffix(".log")) as url:
            print(f"live service on {url}, book {db}")
            print(
                f"replaying the orders open on {since:%Y-%m-%d %H:%M} and the {args.days} days "
                f"after, to {export:%Y-%m-%d %H:%M} (x{args.speed:,.0f}) ..."
            )
            started = time.perf_counter()
            replay = subprocess.run(  # noqa: S603 (our own command)
                [
                    str(CLI),
                    "replay",
                    "--history",
                    str(history),
                    "--url",
                    url,
                    "--since",
                    since.isoformat(),
                    "--speed",
                    str(args.speed),
                    "--api-key",
                    KEY,
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            print("\n".join("  " + line for line in replay.stdout.strip().splitlines()))
            if replay.returncode != 0:
                raise SystemExit(f"the replay failed:\n{replay.stderr[-3000:]}")
            with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=60) as client:
                status = wait_idle(client)
            elapsed = time.perf_counter() - started
    finally:
        inbox.stop()
    english = [alert for alert in inbox.received if alert["lang"] == "en"]
    chinese = {
        (alert["posting_number"], alert["alert_key"]): alert
        for alert in inbox.received
        if alert["lang"] == "zh"
    }
    print(
        f"book after {elapsed:.0f} s: {status['open']:,} open postings "
        f"({', '.join(f'{n:,} {level}' for level, n in sorted(status['open_by_risk'].items()))}), "
        f"{status['scores']:,} scores, {status['alerts']:,} alerts delivered"
    )
    riskiest = sorted(english, key=lambda alert: -alert["probability"])[: args.top]
    print(f"the {len(riskiest)} riskiest of {len(english)} alerts (English channel):")
    for alert in riskiest:
        print(_alert_line(alert))
    keys = [(alert["posting_number"], alert["alert_key"]) for alert in riskiest[:3]]
    zh = [chinese[key] for key in keys if key in chinese]
    if zh:
        print("the same on the Chinese channel:")
        for alert in zh:
            print(_alert_line(alert))
    print()
    print(f"The live book: {db} (sqlite; CANCEL_RISK_DB_URL=postgresql://... for a server)")
    print(
        f"Start it again:  CANCEL_RISK_API_KEYS={KEY} CANCEL_RISK_CLOCK=events "
        f"{CLI.name} serve --db sqlite:///{db}"
    )
    print("  (CANCEL_RISK_CLOCK=events: the demo's orders are scored at their own time)")
    print(
        f"  risky orders:  curl -s -H 'X-API-Key: {KEY}' 'http://127.0.0.1:8000/v1/postings?risk=high'"
    )
    print(f"  its archive:   {CLI.name} archive --db sqlite:///{db} --out {db.parent / 'archive'}")
    print(f"Seller dashboard: http://127.0.0.1:8000/ui (once started as above; log in with {KEY})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", required=True, help="The shop's history directory.")
    parser.add_argument("--db", required=True, help="Where the demo's book is kept (SQLite).")
    parser.add_argument("--days", type=float, default=2.0, help="Days replayed at --speed.")
    parser.add_argument("--speed", type=float, default=8640.0, help="History seconds per second.")
    parser.add_argument("--top", type=int, default=5, help="Alerts printed.")
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
