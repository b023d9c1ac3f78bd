"""A small Dockerfile reader for tests that cannot run `docker build`: instructions with their
continuation lines joined, ARG defaults, ENV as a dict, and the command the image runs."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Dockerfile:
    instructions: list[tuple[str, str]]                  # (INSTRUCTION, arguments), comments dropped
    args: dict[str, str] = field(default_factory=dict)   # ARG defaults
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        lines, current = [], ""
        for raw in Path(path).read_text().splitlines():
            if raw.lstrip().startswith("#") and not current:
                continue
            if raw.lstrip().startswith("#"):
                continue
            current += raw.rstrip()
            if current.endswith("\\"):
                current = current[:-1] + " "
                continue
            if current.strip():
                lines.append(current.strip())
            current = ""
        instructions = [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]
        df = cls(instructions)
        for name, value in instructions:
            if name == "ARG" and "=" in value:
                k, v = value.split("=", 1)
                df.args[k.strip()] = v.strip()
            elif name == "ENV":
                for item in shlex.split(value):
                    k, v = item.split("=", 1)
                    df.env[k] = v
        return df

    def all(self, name: str) -> list[str]:
        return [v for n, v in self.instructions if n == name]

    def last(self, name: str) -> str | None:
        found = self.all(name)
        return found[-1] if found else None

    def base_image(self) -> str:
        image = self.all("FROM")[-1].split()[0]
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: self.args[m.group(1) or m.group(2)], image)

    def exec_form(self, name: str) -> list[str]:
        value = self.last(name)
        assert value is not None and value.startswith("["), f"{name} is not in exec form: {value}"
        return json.loads(value)

    def command(self) -> list[str]:
        """What `docker run IMAGE` runs: ENTRYPOINT + CMD."""
        return self.exec_form("ENTRYPOINT") + self.exec_form("CMD")
