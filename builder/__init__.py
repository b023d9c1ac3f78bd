"""serverless-triton's build pipeline and command-line tools.

Turns checkpoints into per-precision engines and a Triton model repository
(`build-engines`), and serves, syncs and guards that repository (`serverless-triton`).
"""

__version__ = "0.1.0"
