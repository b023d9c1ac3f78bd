"""The one way the project renders templates (model configs, nginx.conf): jinja2 with
StrictUndefined, so a missing value is an error, never an empty string or a `${...}` left behind."""

from __future__ import annotations

from pathlib import Path

import jinja2


def strict_environment(folder: Path, **options) -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(folder)), undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=True, autoescape=False, **options)
