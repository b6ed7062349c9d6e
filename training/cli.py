"""The `cancel-risk` command line. Commands parse options and delegate; no logic lives here."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from training import __version__

app = typer.Typer(
    help="Ozon cancellation-risk: simulate, inspect, train and score a seller's order history.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

HistoryOption = Annotated[
    Path,
    typer.Option("--history", help="History directory (see data/CONTRACT.md).", show_default=False),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[
        int, typer.Option("-v", "--verbose", count=True, help="-v info, -vv debug.")
    ] = 0,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def fail(message: str) -> typer.Exit:
    """Print one clear message to stderr and return the exit (code 2) to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


@app.command()
def simulate(
    out: Annotated[Path, typer.Option("--out", help="Directory to write the history into.")],
    days: Annotated[int, typer.Option(min=1, help="Simulated days of trading.")] = 120,
    orders_per_day: Annotated[int, typer.Option(min=1, help="Mean orders per day.")] = 150,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same files.")] = 0,
    format: Annotated[
        str, typer.Option("--format", help="Postings as API JSON Lines (jsonl) or cabinet csv.")
    ] = "jsonl",
    truth: Annotated[
        bool, typer.Option("--truth", help="Also write truth.csv: true cancel probabilities.")
    ] = False,
) -> None:
    """Simulate a seller's shop and write its history in the contract's format."""
    from training.simulator import SimulationConfig, simulate_shop, write_history

    if format not in ("jsonl", "csv"):
        raise fail(f"--format must be jsonl or csv, not {format!r}")
    world = simulate_shop(
        SimulationConfig(days=days, orders_per_day=orders_per_day, seed=seed), truth=truth
    )
    written = write_history(world, out, posting_format=format, truth=truth)
    for path in written:
        typer.echo(f"wrote {path}")


@app.command()
def inspect(
    history: HistoryOption,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    csv_cancellations_are_buyer: Annotated[
        bool,
        typer.Option(
            "--csv-cancellations-are-buyer",
            help="Count cancelled orders.csv rows (no initiator there) as buyer cancellations.",
        ),
    ] = False,
) -> None:
    """Load a history directory and print what was read, kept and rejected."""
    from training.errors import HistoryError
    from training.ingest import load_history
    from training.inspect import format_summary, summarize

    try:
        tables = load_history(history, csv_cancellations_are_buyer=csv_cancellations_are_buyer)
    except HistoryError as exc:
        raise fail(str(exc)) from None
    summary = summarize(tables)
    if as_json:
        typer.echo(json.dumps(summary, ensure_ascii=False, indent=2, default=str))
    else:
        typer.echo(format_summary(summary))
