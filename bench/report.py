"""The results document as a Markdown table, and its place in docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

START = "<!-- bench:results:start -->"
END = "<!-- bench:results:end -->"


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{value / 1000:,.1f}k"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def markdown(document: dict[str, Any]) -> str:
    """Return the results as Markdown: machine, throughput, memory, latency, targets."""
    machine = document["machine"]
    plan = document["plan"]
    figures = document["figures"]
    raw, spot = figures["raw_copy"], figures["spot_end_to_end"]
    replay, peer = figures["spot_file_replay"], figures["peer_cryptofeed"]
    settings = machine["postgresql_settings"]
    lines = [
        f"Measured {document['generated_at']} in {document['duration_secs']:.0f} s: "
        f"`nproc` {machine['nproc']} ({machine['cpu']}), {machine['memory_gb']} GB RAM, "
        f"PostgreSQL {machine['postgresql']} ({machine['postgresql_where']}; shared_buffers "
        f"{settings['shared_buffers']}, synchronous_commit {settings['synchronous_commit']}), "
        f"Python {machine['python']}, psycopg {machine['packages']['psycopg']}, msgspec "
        f"{machine['packages']['msgspec']}, aiohttp {machine['packages']['aiohttp']}, "
        f"cryptofeed {machine['packages']['cryptofeed']}. Median of {plan['runs']} run(s); "
        f"{plan['messages']:,} messages per throughput run, {plan['peer_messages']:,} for "
        "cryptofeed.",
        "",
        "| rows/s | books (15 levels) | trades | mixed 1:1 |",
        "|---|---:|---:|---:|",
    ]
    for label, key in (
        ("raw binary COPY, primary keys", "with_key"),
        ("raw binary COPY, no keys", "no_key"),
    ):
        lines.append(
            f"| {label} | {_rate(raw['books'][key]['rows_per_sec'])} "
            f"| {_rate(raw['trades'][key]['rows_per_sec'])} | |"
        )
    lines.append(
        "| **spot end to end** (WebSocket → PostgreSQL) "
        + "".join(
            f"| **{_rate(spot.get(k, {}).get('rows_per_sec'))}** "
            for k in ("books", "trades", "mixed")
        )
        + "|"
    )
    if replay.get("available"):
        lines.append(
            "| spot replay (Tardis CSV .gz, whole command) "
            + "".join(
                f"| {_rate(replay.get(k, {}).get('rows_per_sec'))} "
                for k in ("books", "trades", "mixed")
            )
            + "|"
        )
    else:
        lines.append(f"| spot replay | {replay['reason']} | | |")
    if peer.get("available"):
        lines.append(
            f"| cryptofeed {peer['version']} Postgres backend, write path alone "
            f"| {_rate(peer['books']['rows_per_sec'])} "
            f"| {_rate(peer['trades']['rows_per_sec'])} | |"
        )
    else:
        lines.append(f"| cryptofeed | {peer['reason']} | | |")
    lines.append(
        "| bench server's own send rate (msgs/s, into a null reader) "
        f"| {_rate(figures['server_send_rate']['books']['messages_per_sec'])} "
        f"| {_rate(figures['server_send_rate']['trades']['messages_per_sec'])} | |"
    )
    ratio = document["ratios"]
    lines += ["", "| ratio | books | trades |", "|---|---:|---:|"]
    for name, label in (
        ("spot_vs_raw_copy_with_key", "spot / raw COPY with keys"),
        ("spot_vs_raw_copy_no_key", "spot / raw COPY without keys"),
        ("spot_vs_cryptofeed", "spot / cryptofeed"),
        ("file_replay_vs_raw_copy_with_key", "spot replay / raw COPY with keys"),
    ):
        lines.append(
            f"| {label} | {_ratio(ratio.get('books', {}).get(name))} "
            f"| {_ratio(ratio.get('trades', {}).get(name))} |"
        )
    lines += ["", "| messages (mixed) | peak RSS of spot's process | rows/s |", "|---:|---:|---:|"]
    for size, entry in figures["memory"].items():
        lines.append(
            f"| {int(size):,} | {entry['peak_rss_mb']:.0f} MB | {_rate(entry['rows_per_sec'])} |"
        )
    lines += [
        "",
        f"| received → committed at {plan['latency_rate']:,} msgs/s (mixed) | p50 | p99 | max |",
        "|---|---:|---:|---:|",
    ]
    for name, entry in figures["latency"].items():
        lines.append(
            f"| {name.replace('_', ' ')} | {entry['p50_ms']:.0f} ms | {entry['p99_ms']:.0f} ms "
            f"| {entry['max_ms']:.0f} ms |"
        )
    lines += ["", "| target | measured | met |", "|---|---:|:---:|"]
    for name, check in document["targets"].items():
        lines.append(f"| {name} | {check['value']} | {'yes' if check['met'] else '**no**'} |")
    return "\n".join(lines)


def update_doc(path: Path, table: str) -> None:
    """Replace the generated section of `path` (between the markers) with `table`."""
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{START}\n{END}\n"
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    path.write_text(f"{head}{START}\n{table}\n{END}{tail}")
