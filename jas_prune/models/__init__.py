"""Supported models: loading them and finding their FFN neurons.

``load_model`` returns a supported ViT in eval mode from a timm name (random init, local
checkpoint, or weights already in the local cache), the shipped ``builtin:shapes-vit``, or a
Hugging Face directory (``hf:DIR``). ``discover_ffn`` finds, for each block, the FFN whose
neurons jas-prune attributes and prunes (:mod:`.ffn` defines the neuron for plain and gated
FFNs). One module per family registers it in :data:`FAMILIES` (``@FAMILIES.register``; every
module of this package is imported here, so a new family is one new file):

``timm_vit``  timm ``VisionTransformer`` (vit_*, deit_*, DeiT-3, DINOv2, CLIP/SigLIP towers...)
``eva``       timm ``Eva`` (EVA-02: RoPE, SwiGLU)
``beit``      timm ``Beit``
``relpos``    timm ``VisionTransformerRelPos``
``hf``        transformers ``ViTForImageClassification`` / ``DeiTForImageClassification``
"""

from __future__ import annotations

from ..registry import import_submodules

# first: registration order = the order in messages and the order families are tried in
import_submodules(__name__, __path__, first=("timm_vit", "eva", "beit", "relpos", "hf"))

from .builtin import BUILTIN_MODELS, BUILTIN_PREFIX
from .families import FAMILIES, Family, discover_ffn, family_of, find_vit, model_label, num_outputs
from .ffn import FFN_KINDS, FFNInfo, FFNLayer, split_fused_glu
from .hf import HF_PREFIX
from .loading import (
    builtin_weights_path,
    create_model,
    input_size,
    load_error_reason,
    load_model,
    load_state_dict_file,
)
from .spec import model_spec, spec_json


__all__ = [
    "BUILTIN_PREFIX",
    "BUILTIN_MODELS",
    "HF_PREFIX",
    "FAMILIES",
    "Family",
    "FFN_KINDS",
    "FFNLayer",
    "FFNInfo",
    "load_model",
    "create_model",
    "discover_ffn",
    "family_of",
    "find_vit",
    "model_label",
    "num_outputs",
    "split_fused_glu",
    "builtin_weights_path",
    "load_state_dict_file",
    "load_error_reason",
    "input_size",
    "model_spec",
    "spec_json",
]
