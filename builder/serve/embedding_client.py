"""A small tritonclient (HTTP) helper for embedding deployments, e.g. for `make demo`:

    from builder.serve.embedding_client import embed_texts
    vectors = embed_texts("127.0.0.1:8000", "all-minilm-l6-v2-int8", ["a sentence", "another"])

Each text is one batch row (`text` [n, 1] BYTES); a list longer than the model's max_batch_size is
sent in several requests. Errors come back as tritonclient's InferenceServerException (HTTP 400,
with the server's message).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _request_inputs(httpclient, texts: Sequence[str], truncate: bool | None) -> list:
    data = np.array([[t.encode("utf-8")] for t in texts], dtype=object)
    text = httpclient.InferInput("text", list(data.shape), "BYTES")
    text.set_data_from_numpy(data)
    inputs = [text]
    if truncate is not None:
        flags = np.full((len(texts), 1), bool(truncate), dtype=np.bool_)
        t = httpclient.InferInput("truncate", list(flags.shape), "BOOL")
        t.set_data_from_numpy(flags)
        inputs.append(t)
    return inputs


_limits: dict[tuple[str, str], int] = {}   # (url, model) -> max_batch_size: texts per request


def embed_texts(http_url: str, triton_model_name: str, texts: Sequence[str], truncate: bool | None = None,
                timeout: float = 120.0, api_key: str | None = None) -> np.ndarray:
    """Embeddings of `texts` from an embedding ensemble: float32 [len(texts), dimension].

    `truncate=False` asks the server to refuse a text over the model's max length instead of
    truncating it (the default, None, leaves the server's default: truncate). `api_key`: the key
    a `serve` with keys on (the default) wants as `Authorization: Bearer KEY`.
    """
    import tritonclient.http as httpclient

    texts = list(texts)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    if not texts:
        raise ValueError("no texts to embed")
    with httpclient.InferenceServerClient(http_url, connection_timeout=timeout, network_timeout=timeout) as client:
        key = (http_url, triton_model_name)
        if key not in _limits:
            _limits[key] = int(client.get_model_config(triton_model_name, headers=headers).get("max_batch_size") or 0)
        limit = _limits[key] or len(texts)
        parts = []
        for i in range(0, len(texts), limit):
            result = client.infer(triton_model_name, _request_inputs(httpclient, texts[i:i + limit], truncate),
                                  outputs=[httpclient.InferRequestedOutput("embedding")], headers=headers)
            parts.append(result.as_numpy("embedding"))
    return np.concatenate(parts).astype(np.float32, copy=False)
