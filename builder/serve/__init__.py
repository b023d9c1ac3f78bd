"""Serve layer: tritonserver, the nginx front, object storage and GPU host checks, run by serving.py."""
