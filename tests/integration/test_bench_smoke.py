"""The benchmark harness runs end to end on tiny N and yields every figure (no timing asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from bench.harness import Plan, run_plan
from bench.report import END, START, markdown, update_doc

pytestmark = pytest.mark.slow


def test_harness_on_tiny_n_produces_every_figure(pg_url: str, tmp_path: Path) -> None:
    # Arrange
    plan = Plan(
        dsn=pg_url,
        runs=1,
        messages=2_000,
        peer_messages=500,
        memory_sizes=(500, 1_000),
        latency_rate=2_000,
        latency_secs=0.5,
        progress=lambda line: None,
    )

    # Act
    document = run_plan(plan)
    doc = tmp_path / "benchmarks.md"
    update_doc(doc, markdown(document))

    # Assert
    figures = document["figures"]
    for kind in ("books", "trades"):
        for keyed in ("with_key", "no_key"):
            assert figures["raw_copy"][kind][keyed]["rows_per_sec"] > 0
        assert figures["server_send_rate"][kind]["messages_per_sec"] > 0
    for kind in ("books", "trades", "mixed"):
        assert figures["spot_end_to_end"][kind]["rows_per_sec"] > 0
        assert figures["spot_file_replay"][kind]["rows_per_sec"] > 0
    peer = figures["peer_cryptofeed"]
    if importlib.util.find_spec("cryptofeed") is None:
        assert peer == {"available": False, "reason": peer["reason"]}
    else:
        assert peer["books"]["rows_per_sec"] > 0 and peer["trades"]["rows_per_sec"] > 0
        assert document["ratios"]["trades"]["spot_vs_cryptofeed"] > 0
    assert set(figures["memory"]) == {"500", "1000"}
    assert all(entry["peak_rss_mb"] > 0 for entry in figures["memory"].values())
    for entry in figures["latency"].values():
        assert 0 < entry["p50_ms"] <= entry["p99_ms"] <= entry["max_ms"]
    assert document["ratios"]["books"]["spot_vs_raw_copy_with_key"] > 0
    assert document["targets"]
    assert document["machine"]["nproc"] and document["machine"]["postgresql"]
    text = doc.read_text()
    assert START in text and END in text and "spot end to end" in text
