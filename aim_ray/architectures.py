"""Tensor-name conventions across model families, by pattern (no per-family table for plain merges).

- Decoder layers: a `layers.N` / `h.N` / `blocks.N` / `block.N` / `layer.N` component under any prefix
  (`model.layers.3.`, `transformer.h.3.`, `language_model.model.layers.3.`, `model.language_model.layers.3.`).
- Multimodal front ends (`vision_tower.`, `multi_modal_projector.`, ...) belong before the first decoder layer,
  whatever layer numbering they carry inside.
- Head: final norms (`norm`, `ln_f`, `final_layernorm`, ...) outside the layers and `lm_head` / `embed_out`.
- Vocabulary-sized tensors: `embed_tokens`, `wte`, `word_embeddings`, `embed_in`, `tok_embeddings` (input) and
  `lm_head`, `embed_out` (output), outside a vision tower.
- Layout: GPT-2 stores its Linear-like weights as `Conv1D` `[in, out]`, transposed against `nn.Linear`'s
  `[out, in]`; their input channels are dimension 0 (`input_axis`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
_FRONT = re.compile(r"^(?:model\.)?(vision_tower|vision_model|visual|multi_modal_projector|mm_projector|"
                    r"vision_embed_tokens|image_newline|audio_tower)(?:\.|$)")
# A layer tensor split into (stem, index, suffix): `language_model.model.layers.` `3` `mlp.up_proj.weight`.
_STEM = re.compile(r"^((?:.*?\.)?(?:layers|h|blocks|block|layer)\.)(\d+)\.(.+)$")
_HEAD = re.compile(r"(?:^|\.)(?:lm_head|embed_out|norm|ln_f|final_layernorm|final_layer_norm|final_norm|"
                   r"norm_f)\.")
INPUT_VOCAB = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")
OUTPUT_VOCAB = ("lm_head", "embed_out")
# Module names that are embeddings (token, position, patch): never relaxed, never calibrated.
EMBEDDINGS = frozenset(INPUT_VOCAB + ("wpe", "position_embeddings", "position_embedding", "token_type_embeddings",
                                      "embed_positions", "patch_embedding", "patch_embeddings", "class_embedding",
                                      "vision_embed_tokens"))
# Families whose Linear-like weights are Conv1D `[in, out]`: model_type -> pattern of such weight names.
CONV1D_WEIGHTS = {"gpt2": re.compile(r"(?:^|\.)(?:c_attn|c_proj|c_fc|q_attn)\.weight$")}
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor belongs to (None: not in a decoder layer, e.g. a vision tower's)."""
    if _FRONT.match(name):
        return None
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def split_layer(name: str) -> tuple[str, int, str] | None:
    """(stem, layer index, suffix) of a tensor inside a numbered layer (front ends' layers too), else None."""
    m = _STEM.match(name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def front_module(name: str) -> str | None:
    """The multimodal front end a tensor belongs to (`vision_tower`, `multi_modal_projector`, ...), else None."""
    m = _FRONT.match(name)
    return m.group(1) if m else None


def layer_count_key(config: Mapping[str, Any], section: str | None = None) -> str | None:
    """The config key holding the decoder's layer count (`num_hidden_layers`, GPT-2's `n_layer`, or under
    `text_config`), or under `section` (e.g. `vision_config`); dotted, None when there is none."""
    scopes = [section] if section else [None, "text_config", "llm_config"]
    for scope in scopes:
        cfg = config.get(scope) if scope else config
        for key in LAYER_KEYS if isinstance(cfg, Mapping) else ():
            if isinstance(cfg.get(key), int) and not isinstance(cfg.get(key), bool):
                return f"{scope}.{key}" if scope else key
    return None


def is_front(name: str) -> bool:
    """A multimodal front end (vision tower, projector): placed with the embeddings."""
    return bool(_FRONT.match(name))


def is_head(name: str) -> bool:
    """Final norm or output head (a tensor outside every decoder layer)."""
    return layer_index(name) is None and not is_front(name) and bool(_HEAD.search(name))


def _module(name: str) -> str:
    return name.removesuffix(".weight").removesuffix(".bias")


def is_vocab_tensor(name: str) -> bool:
    """A weight with one row per vocabulary entry (input embedding or output head) of the language model."""
    if is_front(name) or not name.endswith(".weight"):
        return False
    return _module(name).rpartition(".")[2] in INPUT_VOCAB + OUTPUT_VOCAB


def is_input_embedding(name: str) -> bool:
    return is_vocab_tensor(name) and _module(name).rpartition(".")[2] in INPUT_VOCAB


def is_embedding(name: str) -> bool:
    """Embedding tensors/modules (token, position, patch embeddings under any prefix)."""
    return any(part in EMBEDDINGS for part in name.split("."))


def tied_head(embedding: str) -> str:
    """The head module a tied input embedding stands for: `lm_head` next to the language model
    (`language_model.lm_head` in the legacy LLaVA layout, else the top-level `lm_head`)."""
    return "language_model.lm_head" if embedding.startswith("language_model.") else "lm_head"


def input_embedding(names: Iterable[str]) -> str | None:
    """The input token embedding's tensor name, if stored."""
    return next((n for n in names if is_input_embedding(n)), None)


def num_layers(config: Mapping[str, Any], names: Iterable[str] = ()) -> int:
    """Decoder layers of a model: the config's count (`num_hidden_layers`, GPT-2's `n_layer`, ..., also under
    `text_config` for multimodal models), else one more than the highest layer index in `names`."""
    for cfg in (config, config.get("text_config") or {}, config.get("llm_config") or {}):
        for key in LAYER_KEYS:
            if isinstance(cfg.get(key), int) and not isinstance(cfg.get(key), bool):
                return int(cfg[key])
    indices = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(indices) + 1 if indices else 0


def text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's config (`text_config` of a multimodal model, else the config itself)."""
    return config.get("text_config") or config


def input_axis(name: str, config: Mapping[str, Any]) -> int:
    """The dimension of weight `name` that holds the input channels: -1 (nn.Linear), 0 for Conv1D weights."""
    pattern = CONV1D_WEIGHTS.get(str(config.get("model_type")))
    return 0 if pattern is not None and pattern.search(name) else -1
