"""The wording of a fault a client should retry, shared by the runtime (a Python model whose callee
died) and the gateway (a deployment whose process died under a request or call), so the client
reads the same sentence whichever layer saw the death first."""

from __future__ import annotations


def died_mid_request(who: str, unit: str = "request") -> str:
    """`who` (a model, or "a process serving <deployment>") died while `unit` ran inside it."""
    return f"{who} died while it ran this {unit}; it is being reloaded: retry in a few seconds"
