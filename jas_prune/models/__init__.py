"""Supported models: loading them and finding their FFN neurons.

``load_model`` returns a supported ViT in eval mode from a timm name (random init, local
checkpoint, or weights already in the local cache), the shipped ``builtin:shapes-vit``, or a
Hugging Face directory (``hf:DIR``). ``discover_ffn`` finds, for each block, the FFN whose
neurons jas-prune attributes and prunes (:mod:`.ffn` defines the neuron for plain and gated
FFNs). One module per family registers it in :data:`FAMILIES`:

``timm_vit``  timm ``VisionTransformer`` (vit_*, deit_*, DeiT-3, DINOv2, CLIP/SigLIP towers...)
``eva``       timm ``Eva`` (EVA-02: RoPE, SwiGLU)
``beit``      timm ``Beit``
``relpos``    timm ``VisionTransformerRelPos``
``hf``        transformers ``ViTForImageClassification`` / ``DeiTForImageClassification``
"""

from __future__ import annotations

from . import timm_vit as _timm_vit  # noqa: F401 - registration order = the order in messages
from . import eva as _eva  # noqa: F401
from . import beit as _beit  # noqa: F401
from . import relpos as _relpos  # noqa: F401
from . import hf as _hf  # noqa: F401
from .builtin import BUILTIN_MODELS, BUILTIN_PREFIX
from .families import FAMILIES, Family, discover_ffn, family_of, model_label, num_outputs
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
