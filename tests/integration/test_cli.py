from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from spot.demo import demo_manifest


def _spot(*args: str, home: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_DATA_HOME": str(home / "data"), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "spot", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def _expected_rows() -> dict[str, int]:
    tickers = {
        "BTCUSDT": "btc_usdt",
        "ETHUSDT": "eth_usdt",
        "SOLUSDT": "sol_usdt",
        "BTC-USD": "btc_usd",
        "ETH-USD": "eth_usd",
    }
    expected = {}
    for exchange in demo_manifest()["exchanges"].values():
        for symbol, counts in exchange["counts"].items():
            expected[f"orderbook_{tickers[symbol]}"] = counts["book_snapshot_15_100ms"]
            expected[f"trade_{tickers[symbol]}"] = counts["trade"]
    return expected


def test_demo_runs_on_a_fresh_machine_and_prints_the_manifest_counts(tmp_path: Path) -> None:
    result = _spot("demo", home=tmp_path)

    assert result.returncode == 0, result.stderr
    printed = dict(
        (line.split()[0], int(line.split()[1]))
        for line in result.stdout.splitlines()
        if line.startswith(("orderbook_", "trade_")) and len(line.split()) == 2
    )
    assert printed == _expected_rows()
    assert "[+] Connected to WebSocket" in result.stderr
    assert "[✅] Inserted" in result.stderr
    assert (tmp_path / "data" / "spot" / "demo-postgres" / "PG_VERSION").exists()


def test_run_with_an_invalid_config_names_the_key_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "spot.toml"
    config.write_text("[queue]\nbatchsize = 10\n")

    result = _spot("run", "--config", str(config), home=tmp_path, timeout=30)

    assert result.returncode == 2
    assert "unknown field `batchsize` - at `$.queue`" in result.stderr


def test_run_without_exchanges_says_so_and_exits_2(tmp_path: Path) -> None:
    result = _spot("run", home=tmp_path, timeout=30)

    assert result.returncode == 2
    assert "no [[exchanges]] configured" in result.stderr
