"""Opening an exported model for the deployment scripts: checked file, checked sidecar, session.

onnxruntime, ctypes and the standard library only (no torch), shared by
``predict.py`` and ``benchmark.py``; copy it together with them.

Before a model runs, :func:`open_model` refuses, with one :class:`DeployError` line each:
a sidecar that is not valid JSON or lacks a field the script needs; an ONNX file whose size or
SHA-256 differs from what its sidecar records (``onnx_bytes``, ``onnx_sha256``: required from
sidecar ``format_version`` 2 on, checked whenever present); a file onnxruntime cannot load;
and a model whose input or output does not fit the sidecar (the sidecar of another model).
CUDA is asked for only when it is really usable.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import onnxruntime as ort

__all__ = [
    "DeployError",
    "ADVICE",
    "SIDECAR_FORMAT",
    "CHECKSUM_SINCE_VERSION",
    "cuda_driver_usable",
    "resolve_providers",
    "create_session",
    "sha256_file",
    "sidecar_path",
    "load_sidecar",
    "check_model_file",
    "check_session",
    "open_model",
]

SIDECAR_FORMAT = "jas-prune-onnx"
#: Sidecars of this ``format_version`` and later must carry ``onnx_bytes`` and ``onnx_sha256``.
CHECKSUM_SINCE_VERSION = 2

_PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
_CUDA_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
#: How to continue after a refusal of the file or its sidecar.
ADVICE = "re-export the model, or pass the right --sidecar"


class DeployError(Exception):
    """A refusal of the deployment scripts: one line on stderr, exit code 2, no traceback."""


def cuda_driver_usable() -> bool:
    """True when the CUDA driver loads and reports at least one device (no torch needed)."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            if lib.cuInit(0) != 0:
                return False
            count = ctypes.c_int(0)
            return lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
        except (AttributeError, OSError):
            return False
    return False


def resolve_providers(requested: Sequence[str] = ("cuda", "cpu")) -> list[str]:
    """Providers to ask onnxruntime for: CUDA only when it is really usable; CPU always last."""
    available = set(ort.get_available_providers())
    out: list[str] = []
    for req in requested:
        name = _PROVIDER_ALIASES.get(req.lower(), req)
        if name not in available or name in out:
            continue
        if name in _CUDA_PROVIDERS and not cuda_driver_usable():
            continue
        out.append(name)
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")
    return out


def create_session(model: Path, providers: Sequence[str], threads: int | None) -> ort.InferenceSession:
    """An inference session; ``session.get_providers()[0]`` is the provider that runs.

    Raises:
        DeployError: onnxruntime cannot load the file (damaged, truncated, not ONNX).
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(model), sess_options=opts, providers=resolve_providers(providers))
    except Exception as exc:  # noqa: BLE001 - onnxruntime's InvalidProtobuf, InvalidGraph, Fail, ...
        raise DeployError(f"{model}: onnxruntime cannot load it ({_ort_reason(exc, model)}); the file is "
                          "damaged or not an ONNX model: re-export it") from None


def _ort_reason(exc: BaseException, model: Path) -> str:
    """onnxruntime's message without its code prefix and the repeated path, on one line."""
    text = " ".join(str(exc).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : ", "", text)
    text = re.sub(r"\s*:\s*Load model from .*? failed:\s*", ": ", text, count=1)
    return (text or type(exc).__name__)[:300]


# --------------------------------------------------------------------------------------------
# the file and its sidecar


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def sidecar_path(model: Path) -> Path:
    """``MODEL.json`` beside ``MODEL.onnx``."""
    return model.with_suffix(".json")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and v == v and abs(v) != float("inf")


def _field_error(path: Path, key: str, expected: str, value: Any) -> DeployError:
    shown = json.dumps(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return DeployError(f"sidecar {path}: field '{key}' must be {expected}, not {shown}; {ADVICE}")


def _validate(side: Any, path: Path, need: Sequence[str]) -> dict[str, Any]:
    """The sidecar, with the fields the scripts read checked for presence and type."""
    if not isinstance(side, dict):
        raise DeployError(f"sidecar {path}: not a JSON object; {ADVICE}")
    for key in need:
        if side.get(key) is None:
            raise DeployError(f"sidecar {path}: missing field '{key}'; {ADVICE}")
    fmt = side.get("format")
    if fmt is not None and fmt != SIDECAR_FORMAT:
        raise DeployError(f"sidecar {path}: format {fmt!r} is not a jas-prune ONNX sidecar "
                          f"({SIDECAR_FORMAT!r}); {ADVICE}")
    version = side.get("format_version", 1)
    if not _is_int(version) or version < 1:
        raise _field_error(path, "format_version", "a positive integer", version)
    if version >= CHECKSUM_SINCE_VERSION:
        for key in ("onnx_bytes", "onnx_sha256"):
            if side.get(key) is None:
                raise DeployError(f"sidecar {path}: missing field '{key}' (required from format_version "
                                  f"{CHECKSUM_SINCE_VERSION} on); {ADVICE}")

    size = side.get("input_size")
    if size is not None and not (isinstance(size, list) and len(size) == 3
                                 and all(_is_int(v) and v > 0 for v in size)):
        raise _field_error(path, "input_size", "[channels, height, width] as positive integers", size)
    channels = size[0] if size is not None else None
    for key in ("mean", "std"):
        v = side.get(key)
        if v is None:
            continue
        ok = isinstance(v, list) and all(_is_number(x) for x in v) and (channels is None or len(v) == channels)
        if not ok or (key == "std" and any(x <= 0 for x in v)):
            count = f"{channels} " if channels else ""
            kind = "positive numbers" if key == "std" else "numbers"
            raise _field_error(path, key, f"a list of {count}{kind}", v)
    crop = side.get("crop_pct")
    if crop is not None and not (_is_number(crop) and crop > 0):
        raise _field_error(path, "crop_pct", "a positive number", crop)
    for key in ("input_name", "output_name", "interpolation", "crop_mode", "onnx_file"):
        v = side.get(key)
        if v is not None and not (isinstance(v, str) and v):
            raise _field_error(path, key, "a non-empty string", v)
    num = side.get("num_classes")
    if num is not None and not (_is_int(num) and num > 0):
        raise _field_error(path, "num_classes", "a positive integer", num)
    names = side.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise _field_error(path, "class_names", "a list of strings", names)
    mapping = side.get("label_mapping")
    if mapping is not None and not (isinstance(mapping, list) and all(_is_int(m) for m in mapping)
                                    and (num is None or len(mapping) == num)):
        raise _field_error(path, "label_mapping", f"null or a list of {num} integers" if num else
                           "null or a list of integers", mapping)
    nbytes = side.get("onnx_bytes")
    if nbytes is not None and not (_is_int(nbytes) and nbytes > 0):
        raise _field_error(path, "onnx_bytes", "the ONNX file's size in bytes", nbytes)
    digest = side.get("onnx_sha256")
    if digest is not None and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise _field_error(path, "onnx_sha256", "64 lowercase hex digits", digest)
    return side


def load_sidecar(model: Path, sidecar: Path | None = None, *, required: bool = True,
                 need: Sequence[str] = ("input_size", "mean", "std")) -> dict[str, Any] | None:
    """The sidecar of ``model`` (``MODEL.json`` unless given), checked.

    Args:
        required: refuse when there is none; otherwise return ``None`` then.
        need: fields that must be present (the rest are checked when present).

    Raises:
        DeployError: missing (when required), unreadable, not JSON, a field missing or malformed.
    """
    path = sidecar or sidecar_path(model)
    if not path.is_file():
        if sidecar is not None or required:
            where = "" if sidecar is not None else f" beside {model}"
            raise DeployError(f"no sidecar {path}{where} (pass --sidecar PATH)")
        return None
    try:
        text = path.read_bytes().decode("utf-8")
        side = json.loads(text)
    except OSError as exc:
        raise DeployError(f"sidecar {path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise DeployError(f"sidecar {path}: not valid JSON (not UTF-8 text); {ADVICE}") from None
    except json.JSONDecodeError as exc:
        raise DeployError(f"sidecar {path}: not valid JSON ({exc.msg} at line {exc.lineno} column "
                          f"{exc.colno}); {ADVICE}") from None
    return _validate(side, path, need)


def check_model_file(model: Path, side: dict[str, Any], side_path: Path) -> None:
    """Refuse an ONNX file whose size or SHA-256 differs from what its sidecar records.

    Nothing is checked for a sidecar without ``onnx_bytes`` / ``onnx_sha256`` (format 1).
    """
    recorded = side.get("onnx_file")
    other = f" (it was written for {recorded})" if recorded and recorded != model.name else ""
    nbytes = side.get("onnx_bytes")
    if nbytes is not None:
        actual = model.stat().st_size
        if actual != nbytes:
            raise DeployError(f"{model}: {actual} bytes, but its sidecar {side_path} records {nbytes}{other}: "
                              f"the file is truncated or was replaced; {ADVICE}")
    digest = side.get("onnx_sha256")
    if digest is not None and sha256_file(model) != digest:
        raise DeployError(f"{model}: its SHA-256 differs from the one its sidecar {side_path} records{other}: "
                          f"the file was modified, or the sidecar belongs to another file; {ADVICE}")


def check_session(session: ort.InferenceSession, side: dict[str, Any], model: Path, side_path: Path) -> None:
    """Refuse a model whose input or output does not fit its sidecar (another model's sidecar)."""
    def fail(what: str) -> DeployError:
        return DeployError(f"{model} does not match its sidecar {side_path}: {what}; {ADVICE}")

    inputs = session.get_inputs()
    outputs = {o.name: o for o in session.get_outputs()}
    input_name = side.get("input_name", "pixel_values")
    if len(inputs) != 1 or inputs[0].name != input_name:
        raise fail(f"the model's inputs are {[i.name for i in inputs]}, the sidecar names {input_name!r}")
    size = side.get("input_size")
    shape = list(inputs[0].shape)
    if size is not None:
        if len(shape) != 4 or any(_is_int(d) and d != s for d, s in zip(shape[1:], size)):
            raise fail(f"the model takes {_shape(shape)}, the sidecar describes [batch, "
                       f"{', '.join(map(str, size))}]")
    output_name = side.get("output_name", "logits")
    if output_name not in outputs:
        raise fail(f"the model's outputs are {sorted(outputs)}, the sidecar names {output_name!r}")
    out_shape = list(outputs[output_name].shape)
    num = side.get("num_classes")
    if num is not None and (len(out_shape) != 2 or (_is_int(out_shape[1]) and out_shape[1] != num)):
        raise fail(f"the model outputs {_shape(out_shape)}, the sidecar describes {num} classes")


def _shape(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"


def open_model(model: Path, sidecar: Path | None = None, *, providers: Sequence[str] = ("cuda", "cpu"),
               threads: int | None = None, sidecar_required: bool = True,
               need: Sequence[str] = ("input_size", "mean", "std"),
               validate: Callable[[dict[str, Any], Path], None] | None = None,
               ) -> tuple[ort.InferenceSession, dict[str, Any] | None]:
    """Check ``model`` and its sidecar, then open a session on it.

    Order: the file exists; the sidecar is valid JSON with the ``need`` fields (and passes the
    script's own ``validate(sidecar, path)``); the file's size and SHA-256 match the sidecar;
    onnxruntime loads it; its input and output fit the sidecar.

    Raises:
        DeployError: the first check that fails, as one line.
    """
    if not model.is_file():
        raise DeployError(f"model file not found: {model}")
    side_path = sidecar or sidecar_path(model)
    side = load_sidecar(model, sidecar, required=sidecar_required, need=need)
    if side is not None and validate is not None:
        validate(side, side_path)
    if side is not None:
        check_model_file(model, side, side_path)
    session = create_session(model, providers, threads)
    if side is not None:
        check_session(session, side, model, side_path)
    return session, side
