"""What an embedding checkpoint's sentence-transformers files say about turning token embeddings
into sentence vectors (modules.json, 1_Pooling, 2_Normalize, sentence_bert_config.json), read at
build time into the runtime's `EmbeddingConfig`, which the Triton models then load."""

from __future__ import annotations

import json
from pathlib import Path

from backends.embedding import POOLING_MODES, EmbeddingConfig
from backends.errors import SourceError, UnsupportedModelError

# --pooling (builder.build.deployment.POOLINGS) -> sentence-transformers' mode name.
POOLING_ALIASES = {"mean": "mean", "cls": "cls", "last": "lasttoken"}
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_ST_MODULES = {"Transformer", "Pooling", "Normalize"}

def _read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise SourceError(f"{path} is not valid JSON ({e}): fix or re-download the checkpoint") from None


def pooling_modes(pooling_config: dict) -> tuple[str, ...]:
    """The modes of a 1_Pooling/config.json, old (`pooling_mode_*_tokens` flags) or new format."""
    mode = pooling_config.get("pooling_mode")
    if mode is None:
        modes = tuple(m for k, m in _LEGACY_POOLING_KEYS.items() if pooling_config.get(k))
        modes = modes or ("mean",)  # sentence-transformers' default when no flag is set
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown or not modes:
        raise UnsupportedModelError(f"pooling mode {', '.join(unknown) or '(none)'} is not one sentence-transformers "
                                    f"defines ({', '.join(POOLING_MODES)})")
    return modes  # include_prompt does not matter: no prompt is ever prepended here


def usable_positions(config: dict) -> int | None:
    """Positions the encoder really has (RoBERTa-style models reserve padding_idx + 1 of them)."""
    positions = config.get("max_position_embeddings")
    if not isinstance(positions, int) or positions <= 0:
        return None
    if config.get("model_type") in ("roberta", "xlm-roberta", "camembert"):
        pad = config.get("pad_token_id")
        return positions - (1 if pad is None else int(pad)) - 1
    return positions


def model_max_length(hf_dir: Path, config: dict, origin: str | None = None) -> int:
    """The longest input the model takes, as sentence-transformers decides it: `max_seq_length`
    from sentence_bert_config.json, else the tokenizer's model_max_length; both capped at the
    encoder's usable positions."""
    candidates = []
    st_path = Path(hf_dir) / "sentence_bert_config.json"
    st_max = _read_json(st_path).get("max_seq_length") if st_path.is_file() else None
    if isinstance(st_max, int) and st_max > 0:
        candidates.append(st_max)
    else:
        tok_path = Path(hf_dir) / "tokenizer_config.json"
        tok_max = _read_json(tok_path).get("model_max_length") if tok_path.is_file() else None
        if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:  # transformers' "no limit" is 1e30
            candidates.append(tok_max)
    if usable_positions(config) is not None:
        candidates.append(usable_positions(config))
    if not candidates:
        raise SourceError(f"{origin or hf_dir} states no maximum input length: pass --context-size")
    return min(candidates)


def read_checkpoint_config(hf_dir: Path, config: dict, pooling: str | None = None,
                           context_size: int | None = None, origin: str | None = None) -> EmbeddingConfig:
    """What the sentence-transformers files of a checkpoint say (modules.json, 1_Pooling,
    2_Normalize, sentence_bert_config.json), or --pooling for a plain transformers checkpoint.

    `pooling` (--pooling) overrides the checkpoint's pooling; `context_size` (--context-size)
    overrides max_seq_length, up to the encoder's position limit. `origin` (what the user pointed
    at) names the checkpoint in messages.
    """
    hf_dir = Path(hf_dir)
    where = origin or str(hf_dir)
    hidden = config.get("hidden_size") or config.get("dim") or config.get("d_model")
    if not isinstance(hidden, int):
        raise UnsupportedModelError(f"{where}/config.json states no hidden_size: cannot size the embeddings")
    modes, normalize, source, lower = None, False, None, False
    modules_path = hf_dir / "modules.json"
    if modules_path.is_file():
        modules = _read_json(modules_path)
        if not isinstance(modules, list):
            raise SourceError(f"{modules_path} is not a list of modules: fix or re-download the checkpoint")
        for m in modules:
            kind = str(m.get("type", "")).rsplit(".", 1)[-1]
            if kind not in _ST_MODULES:
                raise UnsupportedModelError(
                    f"{where} uses the sentence-transformers module {m.get('type')!r}, which this builder does not "
                    f"reproduce (supported: Transformer, Pooling, Normalize): choose another embedding model")
            if kind == "Transformer" and m.get("path", "") not in ("", "."):
                raise UnsupportedModelError(f"{where}: the transformer lives in the sub-folder {m['path']!r}; "
                                            "point to that folder's checkpoint instead")
            if kind == "Pooling":
                path = hf_dir / m.get("path", "1_Pooling") / "config.json"
                if not path.is_file():
                    raise SourceError(f"{where}: modules.json lists a Pooling module but {path.relative_to(hf_dir)} is missing")
                modes, source = pooling_modes(_read_json(path)), f"{m.get('path', '1_Pooling')}/config.json"
            normalize = normalize or kind == "Normalize"
        st_path = hf_dir / "sentence_bert_config.json"
        if st_path.is_file():
            lower = bool(_read_json(st_path).get("do_lower_case", False))
    elif (hf_dir / "1_Pooling" / "config.json").is_file():
        modes, source = pooling_modes(_read_json(hf_dir / "1_Pooling" / "config.json")), "1_Pooling/config.json"
    if pooling is not None:
        if pooling not in POOLING_ALIASES:
            raise UnsupportedModelError(f"unknown pooling {pooling!r}: choose from {', '.join(POOLING_ALIASES)}")
        modes, source = (POOLING_ALIASES[pooling],), "--pooling"
    if modes is None:
        raise UnsupportedModelError(
            f"{where} is a plain transformers checkpoint (no modules.json or 1_Pooling/config.json), so it does not "
            "say how to pool token embeddings: pass --pooling mean, cls or last (mean suits most BERT-family models)")
    if context_size is not None:
        usable = usable_positions(config)
        if usable is not None and context_size > usable:
            raise UnsupportedModelError(f"context size {context_size} exceeds the encoder's {usable} usable positions: "
                                        f"use --context-size {usable} or less")
        max_length = context_size
    else:
        max_length = model_max_length(hf_dir, config, where)
    pad = config.get("pad_token_id")
    return EmbeddingConfig(max_length=max_length, pooling=modes, normalize=normalize, hidden_size=hidden,
                           do_lower_case=lower, pad_id=int(pad) if isinstance(pad, int) else 0,
                           pooling_source=source)
