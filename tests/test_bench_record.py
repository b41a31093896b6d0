"""benchmarks/record.py: a benchmark's --json target follows the project's output rules (checked
before the work, never replacing what a benchmark did not write, never half-written)."""

import argparse
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.record import JsonReport, add_json_arguments  # noqa: E402


def report_for(*argv: str) -> JsonReport:
    parser = argparse.ArgumentParser(prog="bench_example.py")
    add_json_arguments(parser)
    return JsonReport(parser, parser.parse_args(list(argv)))


def test_a_report_names_its_benchmark_and_a_second_save_replaces_the_first(tmp_path):
    out = tmp_path / "run.json"
    report = report_for("--json", str(out))
    report.save({"results": {"a": 1}})
    report.save({"results": {"a": 1, "b": 2}})
    assert json.loads(out.read_text()) == {"benchmark": "bench_example",
                                           "results": {"a": 1, "b": 2}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]  # no temporaries left


def test_an_existing_file_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "run.json"
    out.write_text('{"benchmark": "bench_example"}\n')
    with pytest.raises(SystemExit) as stop:
        report_for("--json", str(out))
    assert stop.value.code == 2
    assert f"{out}: already exists (use --force" in capsys.readouterr().err


def test_force_replaces_a_previous_report_only(tmp_path, capsys):
    previous, other = tmp_path / "previous.json", tmp_path / "notes.json"
    previous.write_text('{"benchmark": "bench_inference", "results": {}}\n')
    other.write_text('{"results": {}}\n')
    report_for("--json", str(previous), "--force").save({"results": {"new": True}})
    assert json.loads(previous.read_text())["results"] == {"new": True}
    with pytest.raises(SystemExit):
        report_for("--json", str(other), "--force")
    assert "not written by this command" in capsys.readouterr().err
    assert other.read_text() == '{"results": {}}\n'


def test_a_failed_save_leaves_the_previous_one(tmp_path):
    out = tmp_path / "run.json"
    report = report_for("--json", str(out))
    report.save({"results": 1})
    with pytest.raises(TypeError):
        report.save({"results": object()})  # not JSON: fails while writing the temporary
    assert json.loads(out.read_text())["results"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_without_json_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report_for().save({"results": 1})
    assert list(tmp_path.iterdir()) == []
