"""The model under study: loading (`load_model`, `ModelHandle`), its anatomy, chat encoding and batching."""

from personascope.model.anatomy import (
    as_module,
    backbone,
    decoder_layers,
    final_norm,
    hidden_size,
    text_config,
    unwrap,
)
from personascope.model.chat import ChatEncoding, chat_ids
from personascope.model.loading import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    ModelHandle,
    cache_dir,
    load_model,
)

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "ChatEncoding",
    "ModelHandle",
    "as_module",
    "backbone",
    "cache_dir",
    "chat_ids",
    "decoder_layers",
    "final_norm",
    "hidden_size",
    "load_model",
    "text_config",
    "unwrap",
]
