"""Make a stored CRD small: keep the served version's openAPIV3Schema, drop every `description`
(documentation only: validation is unchanged) and, where given, properties this project never
writes (a property missing from the stored schema is refused by the tests, so trimming can only
make them stricter). Usage: python trim_crd.py UPSTREAM.yaml OUT.yaml "source line" [dotted.path.to.drop ...]
"""

import sys
from pathlib import Path

import yaml


def strip(node):
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def main(upstream: str, out: str, source: str, *drop: str) -> None:
    crd = yaml.safe_load(Path(upstream).read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    schema = strip(version["schema"]["openAPIV3Schema"])
    for path in drop:
        node = schema
        *parents, last = path.split(".")
        for p in parents:
            node = node["properties"][p]
        del node["properties"][last]
    trimmed = {"group": crd["spec"]["group"], "kind": crd["spec"]["names"]["kind"], "version": version["name"],
               "openAPIV3Schema": schema}
    with open(out, "w") as f:
        f.write(f"# {source}\n# Trimmed by trim_crd.py (README.md): descriptions and unused properties dropped.\n")
        yaml.safe_dump(trimmed, f, sort_keys=True, default_flow_style=None, width=160)


if __name__ == "__main__":
    main(*sys.argv[1:])
