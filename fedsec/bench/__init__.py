"""Benchmark grids of attacks x defenses: grid files, the results store, reports.

* :mod:`fedsec.bench.grid` — parse and validate a grid TOML into cells.
* :mod:`fedsec.bench.store` — the results folder that survives interruption.
* :mod:`fedsec.bench.report` — Markdown and self-contained HTML reports.

The runner (Flower's simulation engine) is :mod:`fedsec.strategies.bench`.
"""
