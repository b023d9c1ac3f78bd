"""The contract every layer shares: tensor names (tensors.py), deployment and Triton model names
(naming.py), precisions and their floors (precisions.py), the typed manifest (manifest.py)."""
