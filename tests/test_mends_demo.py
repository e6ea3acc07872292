"""Issue 14.9 and 14.11, the demo's report: readable text (marked when cut), splitwise decode TPOT
and hand-off wait apart, a request taken from a dead node shown as rescued (not stolen), and an
output folder instead of a PNG in the current directory. The report is fed results of the shape
the workers return; the demo end to end is in tests/test_demo.py."""

from __future__ import annotations

import re
from typing import Any

import pytest
from click.testing import CliRunner

from fd_celery.cli import demo
from fd_celery.cli.demo import NodePlan, Record, readable
from fd_celery.cli.main import main

NODES = ["prefill1@h", "decode1@h"]
PLAN = [NodePlan("prefill1", "prefill"), NodePlan("decode1", "decode")]


def result(text: str, served_by: list[str], tokens: int, tpot_s: float, **extra: Any) -> dict[str, Any]:
    return {
        "request_id": "r",
        "text": text,
        "token_ids": list(range(tokens)),
        "finish_reason": "length",
        "served_by": served_by,
        "stolen": bool(extra.pop("stolen", False)),
        "ttft_s": 0.010,
        "tpot_s": tpot_s,
        "queue_s": 0.001,
        "extra": extra,
    }


def rows(out: str) -> list[str]:
    block = out.split("who served what", 1)[1].split("per node", 1)[0]
    return [line for line in block.splitlines()[2:] if re.match(r"\s+\d+\s", line)]


@pytest.mark.parametrize(
    "text,width,shown",
    [
        ("short", 10, "short"),
        ("line one\nline two\tend", 40, "line one line two end"),
        ("x" * 50, 10, "xxxxxxx..."),
        ("exactly ten", 11, "exactly ten"),
    ],
)
def test_readable_text(text, width, shown):
    assert readable(text, width) == shown
    assert len(readable(text, width)) <= width


def test_splitwise_report_separates_decode_tpot_and_hand_off(capsys):
    # 11 tokens: 10 gaps after the first; 250 ms from the first token to the last, of which
    # 200 ms waiting for the hand-off: the decode node's own TPOT is 5 ms, not 25 ms
    long_text = "Once upon a time\nthere was a scheduler that stole"
    records = [
        Record(0, 1000.0, 11, result=result(long_text, NODES, 11, 0.025, handoff_s=0.200)),
        Record(1, 1000.0, 11, result=result("short", NODES, 11, 0.002, handoff_s=0.0)),
    ]
    demo._report(records, "splitwise", PLAN, NODES)
    out = capsys.readouterr().out
    head = out.split("who served what", 1)[1].splitlines()[1]
    assert "hand-off ms" in head and "TPOT ms" in head
    first, second = rows(out)
    assert re.search(r"\s200\.0\s+5\.0\s", first), first
    assert re.search(r"\s0\.0\s+2\.0\s", second), second
    assert first.endswith(readable(long_text, demo.TEXT_WIDTH)) and first.endswith("...")
    assert "'" not in first and "\\n" not in first  # not a Python repr
    assert second.endswith("  short")
    per_node = out.split("per node", 1)[1].splitlines()
    assert "hand-off p50" in per_node[1]
    decode_row = next(line for line in per_node if line.startswith("decode1"))
    assert decode_row.split()[-1] == "5.0" and decode_row.split()[-2] == "200.0", decode_row


def test_rescued_is_not_stolen(capsys):
    nodes = ["node1@h", "node2@h", "node3@h"]
    plan = [NodePlan(n.split("@")[0], "mixed") for n in nodes]
    records = [
        Record(0, 1.0, 4, result=result("a", ["node2@h"], 4, 0.001, stolen=True, stolen_from="node1@h")),
        Record(1, 1.0, 4, result=result("b", ["node3@h"], 4, 0.001, stolen=True, rescued_from="node1@h")),
        Record(2, 1.0, 4, result=result("c", ["node1@h"], 4, 0.001)),
    ]
    assert records[1].stolen_from is None and records[1].rescued_from == "node1@h"
    demo._report(records, "global", plan, nodes)
    out = capsys.readouterr().out
    stolen, rescued, plain = rows(out)
    assert "(stolen from node1)" in stolen
    assert "(rescued from node1)" in rescued and "stolen" not in rescued
    assert "(" not in plain.split("  ")[1]
    summary = next(line for line in out.splitlines() if "requests completed" in line)
    assert "; 1 stolen (from node1: 1)" in summary and "; 1 rescued from dead nodes (node1: 1)" in summary
    spans = {s.index: s.kind for s in demo._spans(records, "global", plan, nodes)}
    assert spans == {0: "stolen", 1: "rescued", 2: "mixed"}


def test_out_names_a_folder():
    runner = CliRunner()
    done = runner.invoke(main, ["demo", "--out", "timeline.png"])
    assert done.exit_code == 2 and "--out names the output folder" in done.output
    help_text = runner.invoke(main, ["demo", "--help"]).output
    assert "fd-demo-output" in help_text


def test_the_default_output_folder_is_ignored_by_git():
    from pathlib import Path

    ignored = (Path(__file__).parent.parent / ".gitignore").read_text().split()
    assert f"{demo.DEFAULT_OUT_DIR}/" in ignored
