"""spot's benchmark harness: `python -m bench` (see docs/benchmarks.md). Not part of the package.

workload      deterministic Tardis Machine messages (10 tickers), their rows, their CSV
wsserver      loopback Tardis-Machine-protocol server: pre-encoded frames, own process
raw_copy      the ceiling: binary COPY of pre-built spot rows
spot_worker   spot's real pipeline in a process of its own (throughput, memory, latency)
peer          cryptofeed's Postgres backend on the same trades and books
harness       runs them side by side; report writes the JSON and the Markdown table
"""
