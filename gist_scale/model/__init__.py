"""Embedding models: the `Embedder` (encoder + pooling + normalization) and how student and guide are loaded.

`embedder.py` is the module itself, `loading.py` the `from_pretrained` paths (student partitioned under ZeRO-3,
guide frozen and kept outside it), `lora.py` the LoRA adapters, `student.py` the student as training builds it
(encoder, adapters, `Embedder`). The sentence-transformers directory format lives in `gist_scale.st_format`.
"""

from gist_scale.model.embedder import SDPA_MASK_MODEL_TYPES, Embedder, pool
from gist_scale.model.loading import (ModelNotFoundError, find_model, hub_model_not_found, load_guide, load_tokenizer,
                                     outside_zero3, resolve_model_path)
from gist_scale.model.student import load_student

__all__ = ["SDPA_MASK_MODEL_TYPES", "Embedder", "ModelNotFoundError", "find_model", "hub_model_not_found",
           "load_guide", "load_student", "load_tokenizer", "outside_zero3", "pool", "resolve_model_path"]
