"""The Triton Python models, one module per role. Each built model's `1/model.py` only points at the
repository's copy of this runtime and imports its role's `TritonPythonModel` from here."""
