"""Hugging Face ``transformers`` ViT / DeiT image classifiers from a local directory.

``load_model("hf:/path/to/dir")`` reads the directory written by ``save_pretrained`` (config,
weights, optionally ``preprocessor_config.json``) and returns :class:`HFImageClassifier`: the
transformers model behind a ``forward(pixel_values) -> logits`` like a timm model's, which every
part of jas-prune (locating, Torch-Pruning, ONNX export with the ``pixel_values``/``logits``
names) takes as is. The FFN of a layer is ``mlp.fc1 -> mlp.activation_fn -> mlp.fc2``
(transformers 5) or ``intermediate.dense -> intermediate.intermediate_act_fn -> output.dense``
(transformers 4.56+); the neuron is the intermediate activation. ``transformers`` is an optional
dependency (``pip install -e ".[hf]"``), imported only here and only when needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, InvalidArgumentError, PretrainedUnavailableError, UnsupportedModelError
from .families import FAMILIES, Family
from .ffn import FFNInfo, FFNLayer
from .heads import AttentionLayout, Slot

__all__ = ["HF_PREFIX", "HF_CLASSES", "MIN_TRANSFORMERS", "HFImageClassifier", "load_hf", "wrap_hf"]

HF_PREFIX = "hf:"
#: transformers classes jas-prune accepts, with their number of prefix tokens (class token first)
HF_CLASSES = {"ViTForImageClassification": 1, "DeiTForImageClassification": 2}
#: first transformers release whose ViT/DeiT layers return a tensor (earlier ones return tuples)
MIN_TRANSFORMERS = (4, 56)

_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UnsupportedModelError(
            "model.name: 'hf:' models need the optional dependency transformers; install it with "
            "pip install -e \".[hf]\" (or pip install 'transformers>=4.56')") from None
    version = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_TRANSFORMERS:
        raise UnsupportedModelError(
            f"model.name: transformers {transformers.__version__} is installed; 'hf:' models need "
            f"transformers>={'.'.join(map(str, MIN_TRANSFORMERS))} (older ViT layers return tuples)")
    return transformers


class HFImageClassifier(nn.Module):
    """A transformers ViT/DeiT image classifier that returns the logits tensor.

    Attributes (what timm models have and jas-prune reads): ``num_classes``,
    ``pretrained_cfg``/``default_cfg`` (input size, mean/std, interpolation, crop), ``head``
    (the classifier) and ``jas_class_names`` (the config's ``id2label`` when it names classes).
    """

    def __init__(self, model: nn.Module, source: str | None = None,
                 data_config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        kind = type(model).__name__
        if kind not in HF_CLASSES:
            raise UnsupportedModelError(f"model '{source or kind}' is a transformers {kind}; jas-prune supports "
                                        f"{' and '.join(HF_CLASSES)} (one classifier on the class token)")
        self.model = model
        cfg = model.config
        self.num_classes = int(cfg.num_labels)
        size = _pair(cfg.image_size)
        data = {"input_size": (int(cfg.num_channels), *size), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}
        data.update(dict(data_config or {}))
        data["architecture"] = source or f"hf:{kind}"
        self.pretrained_cfg = data
        self.default_cfg = data
        names = [str(cfg.id2label.get(i, cfg.id2label.get(str(i), i))) for i in range(self.num_classes)] \
            if getattr(cfg, "id2label", None) else []
        if names and not all(n == f"LABEL_{i}" for i, n in enumerate(names)):
            self.jas_class_names = names

    def sync_config(self) -> list[str]:
        """Write the pruned sizes into the transformers config, so that the model's own
        ``save_pretrained`` -> ``from_pretrained`` rebuilds it: ``intermediate_size`` when every
        FFN has the same width, ``num_attention_heads``/``head_dim`` when every layer keeps the
        same heads, ``num_labels``/``id2label`` of a cut head. Returns what one config cannot
        hold (widths that differ per layer), empty when the config now describes the model."""
        cfg, problems = self.model.config, []
        widths = sorted({layer.fc1.out_features for layer in _discover(self, "model").layers})
        if len(widths) == 1:
            cfg.intermediate_size = widths[0]
        else:
            problems.append(f"FFN widths differ per layer ({widths[0]}..{widths[-1]})")
        geometry = {(m.q_proj.out_features // m.head_dim, m.head_dim) for m in self.model.modules()
                    if isinstance(getattr(m, "q_proj", None), nn.Linear) and isinstance(getattr(m, "head_dim", None), int)}
        if len(geometry) == 1:
            cfg.num_attention_heads, cfg.head_dim = geometry.pop()
        elif geometry:
            problems.append("attention heads differ per layer")
        head = self.head
        if isinstance(head, nn.Linear) and head.out_features != int(cfg.num_labels):
            names = getattr(self, "jas_head_class_names", None) or [f"LABEL_{i}" for i in range(head.out_features)]
            cfg.num_labels = head.out_features
            cfg.id2label = {i: str(n) for i, n in enumerate(names)}
            cfg.label2id = {str(n): i for i, n in enumerate(names)}
        return problems

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        """transformers' ``save_pretrained`` of the wrapped model, with the config brought up to
        date first (:meth:`sync_config`), so ``from_pretrained`` (and ``load_model('hf:DIR')``)
        rebuilds the pruned model.

        Raises:
            InvalidArgumentError: a pruned shape one config cannot describe (FFN widths that
                differ per layer); nothing is written.
        """
        problems = self.sync_config()
        if problems:
            raise InvalidArgumentError(
                f"save_pretrained: {'; '.join(problems)}, which one transformers config cannot describe "
                "(from_pretrained would build the dense sizes); save with jas_prune.save_pruned(model, "
                "'FILE.safetensors') and load with jas_prune.load_pruned('FILE.safetensors')")
        self.model.save_pretrained(save_directory, **kwargs)

    def forward(self, pixel_values: Tensor) -> Tensor:
        out = self.model(pixel_values=pixel_values)
        return out.logits if hasattr(out, "logits") else out[0]

    @property
    def head(self) -> nn.Module:
        return self.model.classifier

    @property
    def patch_embed(self) -> SimpleNamespace:
        """Geometry in timm's terms (``img_size``, ``patch_size``, ``proj.in_channels``)."""
        cfg = self.model.config
        proj = _base(self.model).embeddings.patch_embeddings.projection
        return SimpleNamespace(img_size=tuple(_pair(cfg.image_size)), patch_size=tuple(_pair(cfg.patch_size)),
                               proj=proj)


def _pair(v: Any) -> list[int]:
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v), int(v)]


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, getattr(model, "base_model_prefix", ""), model)


def _hf_layers(model: nn.Module) -> list[nn.Module]:
    base = _base(model)
    layers = getattr(base, "layers", None)
    if layers is None:
        layers = getattr(getattr(base, "encoder", None), "layer", None)
    if layers is None:
        raise UnsupportedModelError(f"model '{type(model).__name__}': no transformer layers found "
                                    "(expected .layers or .encoder.layer)")
    return list(layers)


def _ffn(index: int, layer: nn.Module, label: str) -> FFNLayer:
    mlp = getattr(layer, "mlp", None)
    if mlp is not None and hasattr(mlp, "fc1"):  # transformers 5
        fc1, act, fc2 = mlp.fc1, getattr(mlp, "activation_fn", None), mlp.fc2
        fwd = None
    else:  # transformers 4.56+: ViTIntermediate / ViTOutput (residual added inside ViTOutput)
        inter, out = getattr(layer, "intermediate", None), getattr(layer, "output", None)
        fc1, act = getattr(inter, "dense", None), getattr(inter, "intermediate_act_fn", None)
        fc2 = getattr(out, "dense", None)
        mlp = None

        def fwd(u: Tensor, _a=act, _f1=fc1, _f2=fc2) -> Tensor:
            return _f2(_a(_f1(u)))

    if not isinstance(fc1, nn.Linear) or not isinstance(fc2, nn.Linear):
        raise UnsupportedModelError(f"model '{label}': layer {index} has no linear FFN (mlp.fc1/fc2 or "
                                    "intermediate.dense/output.dense)")
    if not isinstance(act, nn.Module):
        raise UnsupportedModelError(f"model '{label}': layer {index} FFN activation is a "
                                    f"{type(act).__name__}, not a module a hook can be put on")
    return FFNLayer(index=index, block=layer, fc1=fc1, act=act, fc2=fc2, kind="mlp", mlp=mlp, _forward=fwd)


def _is_hf(model: nn.Module) -> bool:
    return isinstance(model, HFImageClassifier) or type(model).__module__.startswith("transformers.")


def _discover(model: nn.Module, label: str) -> FFNInfo:
    if not isinstance(model, HFImageClassifier):
        raise UnsupportedModelError(
            f"model '{label}' is a transformers {type(model).__name__}, whose forward returns a ModelOutput; "
            "load it with jas_prune.load_model('hf:DIR') or wrap it: "
            "jas_prune.models.hf.wrap_hf(model) (returns the logits tensor)")
    hf = model.model
    layers = tuple(_ffn(i, layer, label) for i, layer in enumerate(_hf_layers(hf)))
    return FFNInfo(layers=layers, has_cls_token=True, num_prefix_tokens=HF_CLASSES[type(hf).__name__],
                   family="hf-vit")


def _image_size(model: nn.Module) -> tuple[int, int, int]:
    cfg = model.model.config
    return (int(cfg.num_channels), *_pair(cfg.image_size))  # type: ignore[return-value]


def _arch(model: nn.Module) -> dict[str, Any]:
    return {"hf_class": type(model.model).__name__, "hf_config": json.loads(model.model.config.to_json_string())}


def _rebuild(name: str, arch: Mapping[str, Any], num_classes: int) -> nn.Module:
    """The architecture of a saved ``hf:`` model, from the config stored in the checkpoint."""
    transformers = _transformers()
    kind = arch.get("hf_class")
    if kind not in HF_CLASSES:
        raise CheckpointError(f"arch.hf_class: {kind!r} is not one of {', '.join(HF_CLASSES)}")
    model_cls = getattr(transformers, kind)
    config = model_cls.config_class.from_dict(dict(arch["hf_config"]))
    return HFImageClassifier(model_cls(config).eval(), source=name)


def _data_config(path: Path) -> dict[str, Any]:
    """timm-style data config from a ``preprocessor_config.json`` (empty when there is none)."""
    file = path / "preprocessor_config.json"
    if not file.is_file():
        return {}
    try:
        pre = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"model.name: cannot read {file}: {exc}") from None
    out: dict[str, Any] = {}
    if pre.get("do_normalize", True) and pre.get("image_mean") and pre.get("image_std"):
        out["mean"], out["std"] = tuple(pre["image_mean"]), tuple(pre["image_std"])
    if pre.get("resample") in _RESAMPLE:
        out["interpolation"] = _RESAMPLE[pre["resample"]]

    def side(v: Any) -> int | None:
        if isinstance(v, Mapping):
            v = v.get("height", v.get("shortest_edge"))
        return int(v) if isinstance(v, (int, float)) else None

    size, crop = side(pre.get("size")), side(pre.get("crop_size"))
    if pre.get("do_center_crop") and size and crop:
        out["crop_pct"] = crop / size
    return out


def wrap_hf(model: nn.Module, source: str | None = None,
            data_config: Mapping[str, Any] | None = None) -> HFImageClassifier:
    """Wrap a transformers ViT/DeiT image classifier so that it returns logits (eval mode)."""
    return HFImageClassifier(model, source=source, data_config=data_config).eval()


def load_hf(name: str, *, checkpoint: Any = None, pretrained: bool = False,
            num_classes: int | None = None) -> HFImageClassifier:
    """``hf:DIR`` -> :class:`HFImageClassifier` in eval mode, float32, from the directory alone.

    Raises:
        UnsupportedModelError: transformers missing or too old, a class other than
            :data:`HF_CLASSES`.
        CheckpointError: missing directory, unreadable config or weights, a ``num_classes`` that
            differs from the directory's.
        PretrainedUnavailableError: ``pretrained`` or ``checkpoint`` given (the directory holds
            the weights).
    """
    path = Path(os.path.expanduser(name[len(HF_PREFIX):]))
    if pretrained:
        raise PretrainedUnavailableError(f"model.pretrained: '{name}' loads the weights in its directory; "
                                         "set pretrained: false")
    if checkpoint is not None:
        raise CheckpointError(f"model.checkpoint: '{name}' loads the weights in its directory; leave "
                              "model.checkpoint unset (save other weights with save_pretrained into a directory)")
    if not path.is_dir():
        raise CheckpointError(f"model.name: {name}: directory not found: {path}")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"model.name: {name}: {path} has no config.json (write it with save_pretrained)")
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - malformed config
        raise CheckpointError(f"model.name: {name}: cannot read {path / 'config.json'}: {exc}") from None
    arch = list(getattr(config, "architectures", None) or [])
    kind = next((a for a in arch if a in HF_CLASSES), None)
    if kind is None:
        found = ", ".join(arch) or type(config).__name__
        raise UnsupportedModelError(f"model.name: {name} holds a {found}; jas-prune supports "
                                    f"{' and '.join(HF_CLASSES)}")
    if num_classes is not None and int(num_classes) != int(config.num_labels):
        raise CheckpointError(f"model.num_classes: {num_classes}, but {name} has a {config.num_labels}-class "
                              "classifier; leave model.num_classes unset")
    data_config = _data_config(path)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # one "Loading weights" bar per model otherwise
    try:
        model = getattr(transformers, kind).from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - missing/corrupt weights
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise CheckpointError(f"model.name: {name}: cannot load the weights in {path}: {first}") from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()
    return wrap_hf(model, source=f"{HF_PREFIX}{path}", data_config=data_config)


def _example() -> nn.Module:
    """A two-block random-init ``ViTForImageClassification`` on 32-px images, wrapped."""
    import transformers

    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, num_labels=5)
    return wrap_hf(transformers.ViTForImageClassification(cfg).eval(), source="hf:example")


def _channels(attn: nn.Module) -> list[Slot]:
    """``q_proj``/``k_proj``/``v_proj`` of a transformers 5 ``ViTAttention``.

    Raises:
        UnsupportedModelError: the transformers 4 layout (``query``/``key``/``value`` with
            ``attention_head_size``/``all_head_size``), whose pruned geometry is not written back.
    """
    if not isinstance(getattr(attn, "q_proj", None), nn.Linear):
        raise UnsupportedModelError("prune.attention: this transformers version's ViT attention (query/key/value, "
                                    "attention_head_size) is not supported; heads are pruned with transformers>=5")
    return [Slot(getattr(attn, f"{r}_proj"), n, 0, r) for r in "qkv" for n in ("weight", "bias")
            if getattr(getattr(attn, f"{r}_proj"), n, None) is not None]


#: separate q/k/v projections, which Torch-Pruning's graph links to the output projection's input
ATTENTION = AttentionLayout(channels=_channels, graph=True, heads_attr="num_attention_heads",
                            scale_attr="scaling", gamma=lambda blk: None)


@FAMILIES.register
def _hf_vit_family() -> Family:
    return Family(
        name="hf-vit",
        label="Hugging Face ViT/DeiT",
        matches=_is_hf,
        discover=_discover,
        image_size=_image_size,
        arch_kwargs=_arch,
        rebuild=_rebuild,
        head=lambda m: m.head if isinstance(m, HFImageClassifier) else None,
        example=_example,
        attention=ATTENTION,
    )
