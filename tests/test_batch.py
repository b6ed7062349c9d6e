"""`cancel-risk score` on one machine: what it writes, that it writes it safely, and its counts."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from batch import (
    OUTPUT_COLUMNS,
    ModelSourceError,
    ScoringOptions,
    build_output_paths,
    load_scoring_model,
    run_batch,
)
from batch.output import (
    ScoreWriter,
    recover_staged_directory,
    remove_stale_temporaries,
)
from batch.progress import LogProgress, RichProgress, build_progress
from cancel_risk.cli import app
from core.explain import build_explanations, explanation_to_dict
from core.features import build_features, open_postings_at
from core.ingest import load_history
from core.playbook import DECISIONS, REASON_CODES, load_playbook

runner = CliRunner()


@pytest.fixture(scope="module")
def history(simulated_history: Path) -> Path:
    return simulated_history


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):
    return load_scoring_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def scored(history: Path, model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One default run's output file (read-only for the tests that share it)."""
    out = tmp_path_factory.mktemp("scored") / "scores.parquet"
    run_batch(history, out, model=model)
    return out


def _files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def _copy_history(history: Path, target: Path) -> Path:
    return Path(shutil.copytree(history, target))


def _append_lines(path: Path, lines: list[str]) -> int:
    """Append lines to a JSON Lines file; returns the 1-based number of the first one."""
    with path.open("rb") as handle:
        first = sum(1 for _ in handle) + 1
    with path.open("a", encoding="utf-8") as handle:
        handle.writelines(line + "\n" for line in lines)
    return first


# --- what is written -----------------------------------------------------------------------


def test_every_open_posting_is_scored_as_the_model_scores_it(
    history: Path, model, scored: Path
) -> None:
    frame = pd.read_parquet(scored)
    tables = load_history(history)
    as_of = tables.latest_event_at()
    expected = model.risk_model.score_tables(tables, as_of)

    assert tuple(frame.columns) == OUTPUT_COLUMNS
    assert frame["posting_number"].tolist() == expected["posting_number"].tolist()
    assert frame["posting_number"].is_monotonic_increasing
    np.testing.assert_array_equal(frame["probability"], expected["probability"])
    assert frame["risk_level"].tolist() == expected["risk_level"].tolist()
    assert set(frame["decision"]) <= set(DECISIONS)
    assert (frame["as_of"] == as_of).all()
    assert (frame["model_name"] == "model").all()
    assert (frame["model_version"] == model.version).all()
    orders = tables.postings.set_index("posting_number")["order_number"]
    assert frame["order_number"].tolist() == orders.loc[frame["posting_number"]].tolist()


def test_medium_and_high_rows_carry_the_explain_modules_reasons_low_rows_none(
    history: Path, model, scored: Path
) -> None:
    frame = pd.read_parquet(scored)
    tables = load_history(history)
    features = build_features(
        tables, tables.latest_event_at(), aggregates=model.risk_model.aggregates
    )
    probabilities = frame["probability"].to_numpy()
    at_risk = (frame["risk_level"] != "low").to_numpy()
    assert at_risk.any() and (~at_risk).any()
    explanations = build_explanations(
        model.risk_model, features, probabilities, with_reasons=at_risk
    )

    reasons = [json.loads(cell) for cell in frame["reasons"]]
    actions = [json.loads(cell) for cell in frame["actions"]]
    for row, explanation in enumerate(explanations):
        as_dict = explanation_to_dict(explanation)
        assert reasons[row] == as_dict["reasons"]
        assert actions[row] == as_dict["actions"]
        assert frame["decision"].iloc[row] == explanation.decision
        assert frame["expected_saving"].iloc[row] == explanation.expected_saving
    assert all(reasons[row] == [] for row in np.flatnonzero(~at_risk))
    assert all(reasons[row] for row in np.flatnonzero(at_risk)), "every order at risk has a reason"
    named = [r["code"] for row in np.flatnonzero(at_risk) for r in reasons[row]]
    assert named and set(named) <= set(REASON_CODES)


def test_chunk_size_does_not_change_a_single_value(
    history: Path, model, scored: Path, tmp_path: Path
) -> None:
    out = tmp_path / "small-chunks.parquet"
    run_batch(history, out, model=model, options=ScoringOptions(chunk_rows=97))
    pd.testing.assert_frame_equal(pd.read_parquet(out), pd.read_parquet(scored), check_exact=True)


def test_chunks_scored_in_worker_processes_write_the_same_bytes(
    history: Path, model, tmp_path: Path
) -> None:
    one, two = tmp_path / "one.parquet", tmp_path / "two.parquet"
    alone = run_batch(history, one, model=model, options=ScoringOptions(chunk_rows=97))
    side_by_side = run_batch(
        history, two, model=model, options=ScoringOptions(chunk_rows=97, workers=2)
    )
    assert pd.read_parquet(one).shape[0] > 3 * 97  # several chunks, so both workers score
    assert two.read_bytes() == one.read_bytes()
    same_counts = {key: value for key, value in alone.summary.items() if key != "outputs"}
    assert {k: v for k, v in side_by_side.summary.items() if k != "outputs"} == same_counts


def test_a_rerun_on_the_same_inputs_writes_the_same_bytes(
    history: Path, model, scored: Path, tmp_path: Path
) -> None:
    first = build_output_paths(scored)
    time.sleep(1.1)  # a timestamp of the run would now differ
    again = run_batch(history, tmp_path / scored.name, model=model).paths
    assert again.scores.read_bytes() == first.scores.read_bytes()
    assert again.rejects.read_bytes() == first.rejects.read_bytes()
    assert again.summary.read_bytes() == first.summary.read_bytes()


def test_csv_output_holds_the_same_values_as_parquet_and_reruns_to_the_same_bytes(
    history: Path, model, scored: Path, tmp_path: Path
) -> None:
    out = tmp_path / "scores.csv"
    run_batch(history, out, model=model)
    raw = out.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # spreadsheet programs then read UTF-8
    run_batch(history, out, model=model)
    assert out.read_bytes() == raw
    csv = pd.read_csv(out, dtype={"order_number": str}, keep_default_na=False)
    parquet = pd.read_parquet(scored)
    assert list(csv.columns) == list(OUTPUT_COLUMNS)
    assert csv["posting_number"].tolist() == parquet["posting_number"].tolist()
    np.testing.assert_array_equal(csv["probability"], parquet["probability"])
    assert csv["reasons"].tolist() == parquet["reasons"].tolist()
    assert (pd.to_datetime(csv["as_of"], utc=True) == parquet["as_of"]).all()
    assert csv["as_of"].iloc[0].endswith("Z")


def test_reasons_and_actions_come_in_the_requested_language(
    history: Path, model, tmp_path: Path
) -> None:
    out = tmp_path / "zh.parquet"
    run_batch(history, out, model=model, options=ScoringOptions(lang="zh"))
    frame = pd.read_parquet(out)
    at_risk = frame[frame["risk_level"] != "low"]
    texts = " ".join(at_risk["actions"]) + " ".join(at_risk["reasons"])
    assert any("\u4e00" <= char <= "\u9fff" for char in texts)
    assert "\\u" not in texts  # written as characters, not escapes


def test_an_earlier_as_of_scores_the_postings_open_then(
    history: Path, model, tmp_path: Path
) -> None:
    tables = load_history(history)
    as_of = tables.latest_event_at() - pd.Timedelta(days=10)
    result = runner.invoke(
        app,
        [
            "score",
            "--history",
            str(history),
            "--out",
            str(tmp_path / "s.parquet"),
            "--model",
            model.uri,
            "--as-of",
            as_of.isoformat(),
        ],
    )
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(tmp_path / "s.parquet")
    assert frame["posting_number"].tolist() == open_postings_at(tables, as_of).tolist()
    assert (frame["as_of"] == as_of).all()


# --- summary and rejects -------------------------------------------------------------------


def test_summary_counts_read_rejected_merged_skipped_and_scored(
    history: Path, model, tmp_path: Path
) -> None:
    copy = _copy_history(history, tmp_path / "history")
    postings = copy / "postings.jsonl"
    duplicate = postings.read_text(encoding="utf-8").splitlines()[0]
    first_bad = _append_lines(
        postings,
        [
            "{not json",
            '{"posting_number": "1-2-3", "products": []}',
            "[1, 2]",
            duplicate,
        ],
    )
    out = tmp_path / "s.parquet"
    result = runner.invoke(
        app, ["score", "--history", str(copy), "--out", str(out), "--model", model.uri]
    )
    assert result.exit_code == 0, result.output
    paths = build_output_paths(tmp_path / "s.parquet")
    summary = json.loads(paths.summary.read_text(encoding="utf-8"))
    counts = summary["postings"]
    frame = pd.read_parquet(paths.scores)
    tables = load_history(copy)
    kept = len(tables.postings)
    open_now = len(open_postings_at(tables, tables.latest_event_at()))

    assert counts["rejected"] == 3
    assert counts["duplicates_merged"] == 1
    assert counts["kept"] == kept
    assert counts["read"] == kept + 3 + 1
    assert counts["scored"] == len(frame) == open_now
    assert counts["skipped_not_open"] == kept - open_now
    assert summary["status"] == "ok"
    assert summary["outputs"]["scores"] == "s.parquet"
    assert sum(summary["risk_levels"].values()) == len(frame)
    assert f"scored: {open_now} open" in result.stdout

    rejects = pd.read_csv(paths.rejects)
    bad = rejects[rejects["file"] == "postings.jsonl"]
    assert bad["line"].tolist() == [first_bad, first_bad + 1, first_bad + 2]
    assert bad["reason"].str.len().gt(0).all()
    assert summary["other_records_rejected"] == len(rejects) - 3


def test_too_many_rejected_postings_fail_without_scores_and_keep_an_earlier_output(
    history: Path, model, tmp_path: Path
) -> None:
    copy = _copy_history(history, tmp_path / "history")
    read = len(load_history(copy).postings)
    bad = int(read * 0.1)
    _append_lines(copy / "postings.jsonl", ["{broken"] * bad)
    out = tmp_path / "out" / "s.parquet"
    paths = build_output_paths(out)
    args = ["score", "--history", str(copy), "--out", str(out), "--model", model.uri]

    failed = runner.invoke(app, [*args, "--max-rejected-share", "0.05"])
    assert failed.exit_code == 2
    assert "posting records were rejected" in failed.stderr
    assert not paths.scores.exists()
    summary = json.loads(paths.summary.read_text(encoding="utf-8"))
    assert summary["status"] == "failed"
    assert summary["postings"]["rejected"] == bad
    assert summary["postings"]["scored"] == 0
    assert len(pd.read_csv(paths.rejects).query("file == 'postings.jsonl'")) == bad
    assert _files(out.parent) == sorted([paths.rejects.name, paths.summary.name])

    passed = runner.invoke(app, [*args, "--max-rejected-share", "0.2"])
    assert passed.exit_code == 0, passed.output
    complete = paths.scores.read_bytes()

    failed_again = runner.invoke(app, [*args, "--max-rejected-share", "0.01"])
    assert failed_again.exit_code == 2
    assert paths.scores.read_bytes() == complete


def test_a_record_dated_in_the_future_does_not_move_the_run_there(
    history: Path, model, tmp_path: Path
) -> None:
    copy = _copy_history(history, tmp_path / "history")
    postings = copy / "postings.jsonl"
    record = json.loads(postings.read_text(encoding="utf-8").splitlines()[0])
    record.update(posting_number="99999999-0001-1", in_process_at="2099-01-01T00:00:00Z")
    _append_lines(postings, [json.dumps(record)])
    args = ["score", "--history", str(copy), "--out", str(tmp_path / "s.parquet")]
    args += ["--model", model.uri]

    refused = runner.invoke(app, args)
    assert refused.exit_code == 2
    assert "2099-01-01" in refused.stderr and "--as-of" in refused.stderr
    assert not (tmp_path / "s.parquet").exists()

    as_of = load_history(history).latest_event_at()
    scored = runner.invoke(app, [*args, "--as-of", as_of.isoformat()])
    assert scored.exit_code == 0, scored.output
    assert (pd.read_parquet(tmp_path / "s.parquet")["as_of"] == as_of).all()


def test_a_playbook_with_a_misspelt_value_stops_the_command_before_anything_is_read(
    history: Path, model, tmp_path: Path
) -> None:
    shipped = Path(load_playbook.__globals__["resources"].files("core") / "playbook.yaml")
    playbook = tmp_path / "playbook.yaml"
    playbook.write_text(
        shipped.read_text(encoding="utf-8").replace("{quiet_days:.0f} days", "{quiet:.0f} days"),
        encoding="utf-8",
    )
    out = tmp_path / "s.parquet"
    args = ["score", "--history", str(history), "--out", str(out), "--model", model.uri]
    refused = runner.invoke(app, [*args, "--playbook", str(playbook)])
    assert refused.exit_code == 2
    assert "'tracking_quiet' fact 'quiet' (en) quotes {quiet}" in refused.stderr
    assert not out.exists() and not list(tmp_path.glob("s.*"))


# --- atomic output -------------------------------------------------------------------------


def _fail_on_second_chunk(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    original = ScoreWriter.write
    calls = {"n": 0}

    def write(self: ScoreWriter, chunk) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise error
        original(self, chunk)

    monkeypatch.setattr(ScoreWriter, "write", write)


def test_a_failure_mid_write_leaves_nothing_behind(
    history: Path, model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out" / "s.parquet"
    _fail_on_second_chunk(monkeypatch, RuntimeError("injected"))
    with pytest.raises(RuntimeError, match="injected"):
        run_batch(history, out, model=model, options=ScoringOptions(chunk_rows=50))
    assert _files(out.parent) == []


def test_an_existing_output_is_replaced_only_by_a_complete_one(
    history: Path, model, scored: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    earlier = build_output_paths(scored)
    paths = build_output_paths(tmp_path / scored.name)
    for source, target in zip(
        (earlier.scores, earlier.rejects, earlier.summary),
        (paths.scores, paths.rejects, paths.summary),
        strict=True,
    ):
        shutil.copyfile(source, target)
    before = {path: path.read_bytes() for path in (paths.scores, paths.rejects, paths.summary)}

    with monkeypatch.context() as patch:
        _fail_on_second_chunk(patch, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            run_batch(history, paths.scores, model=model, options=ScoringOptions(chunk_rows=50))
    assert {path: path.read_bytes() for path in before} == before
    assert _files(tmp_path) == sorted(path.name for path in before)

    run_batch(history, paths.scores, model=model, options=ScoringOptions(lang="ru"))
    assert paths.scores.read_bytes() != before[paths.scores]
    assert len(pd.read_parquet(paths.scores)) == len(pd.read_parquet(scored))


def test_a_full_disk_is_a_clear_error_and_leaves_no_file(
    history: Path, model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out" / "s.parquet"
    _fail_on_second_chunk(monkeypatch, OSError(28, "No space left on device"))
    args = ["--history", str(history), "--out", str(out), "--model", model.uri]
    result = runner.invoke(app, ["score", *args, "--chunk-rows", "50"])
    assert result.exit_code == 2
    assert "No space left on device" in result.stderr
    assert "Traceback" not in result.output
    assert _files(out.parent) == []


PAGE = 4096


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Mounts small tmpfs file systems (a real full disk: ENOSPC from the kernel); needs root."""
    mounted: list[Path] = []

    def mount(size_bytes: int) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        size = max(PAGE, size_bytes // PAGE * PAGE)
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (root needed): {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "--lazy", str(point)], check=False)


def _pages(path: Path) -> int:
    return -(-path.stat().st_size // PAGE)


def test_a_really_full_disk_is_a_clear_error_and_leaves_no_file(
    history: Path, model, scored: Path, tiny_disk
) -> None:
    earlier = build_output_paths(scored)
    # Room for the rejects, the summary and half of the scores: the scores run out of space.
    pages = _pages(earlier.rejects) + _pages(earlier.summary) + _pages(earlier.scores) // 2
    disk = tiny_disk(pages * PAGE)
    out = disk / "scores.parquet"
    args = ["--history", str(history), "--out", str(out), "--model", model.uri]
    result = runner.invoke(app, ["score", *args, "--chunk-rows", "50"])
    assert result.exit_code == 2, result.output
    assert "No space left on device" in result.stderr
    assert "Traceback" not in result.output
    assert _files(disk) == []


def test_a_really_full_disk_keeps_the_earlier_output_whole(
    history: Path, model, scored: Path, tiny_disk
) -> None:
    earlier = build_output_paths(scored)
    # Room for one complete output, not for a second one beside it.
    pages = sum(_pages(p) for p in (earlier.scores, earlier.rejects, earlier.summary))
    disk = tiny_disk((pages + pages // 2) * PAGE)
    out = disk / "scores.parquet"
    args = ["--history", str(history), "--out", str(out), "--model", model.uri]
    assert runner.invoke(app, ["score", *args]).exit_code == 0
    before = {name: (disk / name).read_bytes() for name in _files(disk)}
    assert len(before) == 3

    result = runner.invoke(app, ["score", *args, "--lang", "ru"])
    assert result.exit_code == 2, result.output
    assert "No space left on device" in result.stderr
    assert {name: (disk / name).read_bytes() for name in _files(disk)} == before


KILLED_RUN = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from batch import ScoringOptions, run_batch
    from batch.output import ScoreWriter

    write = ScoreWriter.write

    def write_then_stall(self, chunk):
        write(self, chunk)
        Path(sys.argv[3]).touch()  # a chunk is in the temporary file: kill me now
        time.sleep(120)

    ScoreWriter.write = write_then_stall
    run_batch(sys.argv[1], sys.argv[2], model=sys.argv[4], options=ScoringOptions(chunk_rows=50))
    """
)


def test_sigkill_mid_write_leaves_no_partial_output_and_a_rerun_completes_it(
    history: Path, model, scored: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out" / "scores.parquet"
    ready = tmp_path / "ready"
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, str(history), str(out), str(ready), model.uri],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the run never reached its first write"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()

    left = _files(out.parent)
    assert left and all(name.startswith(".") and name.endswith(".tmp") for name in left)

    result = run_batch(history, out, model=model)
    assert _files(out.parent) == sorted(
        [result.paths.scores.name, result.paths.rejects.name, result.paths.summary.name]
    )
    assert out.read_bytes() == scored.read_bytes()


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_temporaries_of_dead_runs_are_swept_and_those_of_live_runs_kept(tmp_path: Path) -> None:
    final = tmp_path / "s.parquet"
    dead = tmp_path / f".s.parquet.{_dead_pid()}.0a1b.tmp"
    live = tmp_path / f".s.parquet.{os.getppid()}.0a1b.tmp"  # pytest's parent: alive
    other = tmp_path / f".t.parquet.{_dead_pid()}.0a1b.tmp"  # another output's
    for path in (dead, live, other):
        path.write_bytes(b"partial")
    assert remove_stale_temporaries([final]) == [dead]
    assert live.exists() and other.exists()


def test_a_dataset_swap_cut_short_is_finished_or_rolled_back(tmp_path: Path) -> None:
    out = tmp_path / "scores"
    staging = tmp_path / f".scores.{_dead_pid()}.0a1b.tmp"
    earlier = tmp_path / f".scores.{_dead_pid()}.0c1d.old"
    staging.mkdir()
    earlier.mkdir()
    (earlier / "part.parquet").write_bytes(b"the earlier complete output")

    recover_staged_directory(out)  # died after moving the old output aside: put it back
    assert (out / "part.parquet").read_bytes() == b"the earlier complete output"
    assert _files(tmp_path) == ["scores"]

    aside = tmp_path / f".scores.{_dead_pid()}.0e1f.old"
    aside.mkdir()
    recover_staged_directory(out)  # died after the new output was in place: drop the old
    assert _files(tmp_path) == ["scores"]


# --- models, options and progress ----------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*An input example was not provided:UserWarning")
def test_a_registered_champion_is_scored_by_default_and_named_in_the_output(
    history: Path, model, scored: Path, tracking_uri: str, tmp_path: Path
) -> None:
    from training.registry import CHAMPION_ALIAS, log_risk_model, set_alias

    with mlflow.start_run():
        info = log_risk_model(
            model.risk_model, input_example=None, registered_model_name="cancel-risk"
        )
    set_alias("cancel-risk", CHAMPION_ALIAS, str(info.registered_model_version))

    out = tmp_path / "champion.parquet"
    result = runner.invoke(app, ["score", "--history", str(history), "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(out)
    assert (frame["model_name"] == "cancel-risk").all()
    assert (frame["model_version"] == str(info.registered_model_version)).all()
    baseline = pd.read_parquet(scored)
    np.testing.assert_array_equal(frame["probability"], baseline["probability"])
    assert frame["reasons"].tolist() == baseline["reasons"].tolist()


def test_no_champion_in_the_registry_is_a_clear_error(
    history: Path, tracking_uri: str, tmp_path: Path
) -> None:
    result = runner.invoke(
        app, ["score", "--history", str(history), "--out", str(tmp_path / "s.parquet")]
    )
    assert result.exit_code == 2
    assert "models:/cancel-risk@champion" in result.stderr
    assert not (tmp_path / "s.parquet").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/no/such/model"], "no such directory"),
        (["--out", "scores.xlsx"], "must end in .parquet or .csv"),
        (["--lang", "de"], "--lang must be one of"),
        (["--as-of", "yesterday-ish"], "--as-of must be an ISO-8601 moment"),
        (["--history", "/no/such/history"], "does not exist"),
    ],
)
def test_bad_options_are_clear_errors(
    history: Path, tiny_model_dir: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    options = {
        "--history": str(history),
        "--out": str(tmp_path / "s.parquet"),
        "--model": str(tiny_model_dir),
    }
    for flag, value in zip(args[::2], args[1::2], strict=True):
        options[flag] = value if flag != "--out" else str(tmp_path / value)
    result = runner.invoke(app, ["score", *[part for pair in options.items() for part in pair]])
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_a_model_directory_that_is_not_a_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ModelSourceError, match="cannot be scored"):
        load_scoring_model(str(tmp_path))


def test_progress_is_a_bar_on_a_terminal_and_log_lines_otherwise() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    bar = build_progress(Terminal())
    try:
        assert isinstance(bar, RichProgress)
    finally:
        bar.close()
    assert isinstance(build_progress(io.StringIO()), LogProgress)


def test_log_progress_reports_each_stage_with_its_rows(
    history: Path, model, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="batch.progress"):
        result = run_batch(history, tmp_path / "s.parquet", model=model, progress=LogProgress())
    messages = [r.getMessage() for r in caplog.records if r.name == "batch.progress"]
    scored = result.summary["postings"]["scored"]
    assert any(m.startswith("load history done") for m in messages)
    assert any(m.startswith("features done") for m in messages)
    assert f"score: {scored} rows" in messages
    assert any(m.startswith(f"score: {scored} rows done") for m in messages)
