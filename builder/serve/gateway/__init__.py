"""OpenAI-compatible gateway: /v1 models, chat, completions and embeddings over Triton, with API keys.

Kept import-light on purpose: `keys` is also used by the CLI, which must not pull in FastAPI.
Start it with `python -m builder.serve.gateway` or build the app with `app.create_app`.
"""
