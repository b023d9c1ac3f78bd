"""Templates of the Triton model repository, one folder per model role (as in
tensorrtllm_backend's inflight_batcher_llm): `config.pbtxt.j2` rendered by builder/repository.py
with jinja2 StrictUndefined, and a thin `1/model.py` for Python-backend roles."""
