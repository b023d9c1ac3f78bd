"""Build layer: checkpoints (sources/) -> engines per precision (engines/, one target each) -> a
Triton model repository with its own runtime (repository.py, runtime.py), orchestrated by pipeline.py."""
