"""`serverless-triton top`: a live table of every deployment of a running serve, from its metrics
endpoint (the figures come from builder/serve/top_stats.py; this module only renders them)."""

from __future__ import annotations

import time

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table

from builder.cli.base import Command, state_dir_options, state_dir_path
from builder.serve.top_stats import DeploymentRow, metrics_url, rows, scrape


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _state(row: DeploymentRow) -> str:
    if row.loaded is None:
        return "?"
    return "[green]loaded" if row.loaded else "[dim]unloaded"


def table(found: list[DeploymentRow], url: str, interval: float) -> Table:
    t = Table(title=f"{url}  (rates over {interval:g} s)", title_justify="left")
    for name, justify in [("model", "left"), ("state", "left"), ("req/s", "right"), ("errors/s", "right"),
                          ("tok/s in", "right"), ("tok/s out", "right"), ("TTFT p50", "right"),
                          ("TTFT p95", "right"), ("running", "right"), ("waiting", "right"),
                          ("cold starts", "right")]:
        t.add_column(name, justify=justify, no_wrap=True)
    for r in found:
        t.add_row(r.model, _state(r), f"{r.requests_per_s:.2f}", f"{r.errors_per_s:.2f}",
                  f"{r.prompt_tokens_per_s:.1f}", f"{r.generation_tokens_per_s:.1f}", _seconds(r.ttft_p50),
                  _seconds(r.ttft_p95), f"{r.running:.0f}", f"{r.waiting:.0f}", f"{r.cold_starts:.0f}")
    if not found:
        t.add_row("(no serverless_triton_* series yet)", *[""] * 10)
    return t


@click.command(cls=Command)
@state_dir_options
@click.option("--metrics-url", "metrics_url_option", metavar="URL",
              help="The metrics endpoint itself (e.g. http://127.0.0.1:8002/metrics) instead of the serve's "
                   "state directory; needed for serve --no-proxy.")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.1, 3600), metavar="SECONDS",
              help="Seconds between refreshes (and the window rates are computed over).")
@click.option("--once", is_flag=True, help="Print one table (rates over one interval) and exit: for scripts.")
def top(state_dir, http_port, metrics_url_option, interval, once):
    """Every deployment of a running serve, live: state, requests/s, errors/s, tokens/s in and out,
    time to first token p50/p95, running and waiting requests, cold starts. Ctrl-C to quit."""
    url = metrics_url_option or metrics_url(state_dir_path(state_dir, http_port))
    previous = scrape(url)
    if once:
        time.sleep(interval)
        console = Console()
        if not console.is_terminal:   # a pipe or file: one line per deployment, never wrapped at 80 columns
            console = Console(width=200)
        console.print(table(rows(previous, scrape(url)), url, interval))
        return
    with Live(table([], url, interval), auto_refresh=False, screen=False) as live:
        try:
            while True:
                time.sleep(interval)
                current = scrape(url)
                live.update(table(rows(previous, current), url, interval), refresh=True)
                previous = current
        except KeyboardInterrupt:
            pass
