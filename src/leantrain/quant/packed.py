"""Packed export of a :class:`~leantrain.quant.convert.QuantizedModel`: ``save_quantized`` / ``load_quantized``.

**Code packing.** Codes are stored in ``c``-bit two's-complement slots, ``8/c`` per byte, first
element in the lowest bits: ``c = 2`` for ternary (``0 -> 00, +1 -> 01, -1 -> 11``; ``10`` is
invalid), ``c = 4`` for 3- and 4-bit weights (two per byte), ``c = 8`` for 5..8-bit weights. The
element order is the weight tensor's row-major order; the last byte is zero-padded. Scales are stored
raw, little-endian, in the model's scale dtype (float32 or float16), so nothing is rounded on the
way: a loaded model computes with exactly the codes and scales of the saved one and its outputs are
bit-identical (same device and thread count). Each layer's base term is stored with the residual
edges the budget bought (or all computed edges, ``edges="all"``) and their ranking, so
``set_residuals`` keeps working after loading. The FP32 parts (batch norm, biases, layers kept in
FP32, activation scales) are stored as raw tensors listed in the header (name, dtype, shape, byte
range; no pickle). The FP32 shadow weights are *not* stored: a loaded model runs and toggles its
edges but cannot be fine-tuned.

**Any model.** The file stores the quantized state, not the architecture. A zoo model converted
with ``model_spec=`` is rebuilt from the spec alone (``load_quantized(path)``). Any other model
(Hugging Face, torchvision, your own) is rebuilt from an instance of its FP32 architecture, or a
zero-argument builder returning one: ``load_quantized(path, model)``. The instance is deep-copied
(left untouched), prepared exactly as at conversion (:mod:`leantrain.quant.attention`), every
stored layer is checked against the module of the same name (kind, shape, bias, stride, padding,
dilation) and swapped for its quantized form, and the remaining state is loaded strictly (a missing
or unexpected entry is an error). Its own weights are irrelevant: every tensor comes from the file,
so the result is bit-identical to the saved model.

**File layout (format version 2).** ``b"LTQUANT\\0"`` (8 bytes), format version (uint32 LE),
header length H (uint64 LE), H bytes of UTF-8 JSON (model spec or null, conversion config,
per-layer description with byte ranges, payload length), the payload, and a 4-byte trailer: the
CRC-32 (uint32 LE) of *everything before it* (preamble, header and payload). CRC-32 detects every
single-bit error and every burst of up to 32 bits, so any flipped bit or byte anywhere in the file
(header included: e.g. activation bits 8 -> 4) is reported. Loading checks the magic, the CRC, the
version, the header, the payload length, every byte range and every code, and raises ValueError
naming the file and the problem; it never unpickles. Files are written atomically
(:func:`leantrain.storage.write_bytes`).
"""

from __future__ import annotations

import copy
import io
import json
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leantrain.quant.activations import ActQuantizer
from leantrain.quant.attention import prepare_for_quantization
from leantrain.quant.convert import QuantizedModel, replace_submodule
from leantrain.quant.layers import QuantLayer
from leantrain.quant.weights import WeightCodes
from leantrain.storage import write_bytes

__all__ = ["pack_codes", "unpack_codes", "save_quantized", "load_quantized", "MAGIC", "FORMAT_VERSION", "container_bits"]

MAGIC = b"LTQUANT\x00"
FORMAT_VERSION = 2
_PREAMBLE = struct.Struct("<8sIQ")
_TRAILER = struct.Struct("<I")
_SCALE_DTYPES = {"float32": (torch.float32, "<f4"), "float16": (torch.float16, "<f2")}


def container_bits(bits: int) -> int:
    """Slot width for ``bits``-bit codes: 2 (ternary), 4 (3-4 bits) or 8 (5-8 bits)."""
    if bits == 2:
        return 2
    if 3 <= bits <= 4:
        return 4
    if 5 <= bits <= 8:
        return 8
    raise ValueError(f"bits must be in 2..8, got {bits}")


def _qmax(bits: int) -> int:
    return 1 if bits == 2 else 2 ** (bits - 1) - 1


def pack_codes(codes: torch.Tensor, bits: int) -> bytes:
    """Pack integer codes (|code| <= 1 for bits=2, <= 2^(bits-1)-1 otherwise) into bytes (module docstring)."""
    c = container_bits(bits)
    flat = codes.detach().reshape(-1).to(torch.int64).cpu()
    q = _qmax(bits)
    if flat.numel() and int(flat.abs().max()) > q:
        raise ValueError(f"codes out of range for {bits}-bit weights: |code| must be <= {q}")
    per = 8 // c
    u = (flat & ((1 << c) - 1)).to(torch.uint8)
    pad = (-u.numel()) % per
    if pad:
        u = torch.cat([u, torch.zeros(pad, dtype=torch.uint8)])
    u = u.reshape(-1, per)
    packed = torch.zeros(u.shape[0], dtype=torch.uint8)
    for j in range(per):
        packed |= u[:, j] << (c * j)
    return packed.numpy().tobytes()


def unpack_codes(data: bytes, numel: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``numel`` int8 codes; invalid slots or padding raise ValueError."""
    c = container_bits(bits)
    per = 8 // c
    need = (numel + per - 1) // per
    if len(data) != need:
        raise ValueError(f"packed codes hold {len(data)} bytes, expected {need} for {numel} {bits}-bit codes")
    b = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
    mask = (1 << c) - 1
    u = torch.stack([(b >> (c * j)) & mask for j in range(per)], dim=1).reshape(-1).to(torch.int16)
    if u[numel:].any():
        raise ValueError("packed codes have non-zero padding bits")
    u = u[:numel]
    v = torch.where(u >= (1 << (c - 1)), u - (1 << c), u)
    q = _qmax(bits)
    if numel and int(v.abs().max()) > q:
        raise ValueError(f"packed codes hold a slot outside the {bits}-bit code range [-{q}, {q}]")
    return v.to(torch.int8)


def _is_term_key(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    return (leaf.startswith("codes") and leaf[5:].isdigit()) or (leaf.startswith("scales") and leaf[6:].isdigit())


def _float_state(qmodel: QuantizedModel) -> dict[str, torch.Tensor]:
    shadow = {f"{n}.weight" for n, layer in qmodel.quant_layers().items() if layer.weight is not None}
    return {k: v.detach().cpu() for k, v in qmodel.model.state_dict().items() if not _is_term_key(k) and k not in shadow}


_STATE_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool")


def _put_state(state: dict[str, torch.Tensor], put: Any) -> dict[str, Any]:
    """Raw little-endian bytes of each tensor; the header keeps name, dtype, shape and byte range.

    Tied entries (one tensor under two names, e.g. a language model's input embedding and output
    head) are stored once; both names point at the same byte range.
    """
    meta = {}
    stored: dict[tuple, list[int]] = {}
    for key, v in state.items():
        dtype = str(v.dtype).removeprefix("torch.")
        if dtype not in _STATE_DTYPES:
            raise ValueError(f"cannot store state entry {key!r} of dtype {dtype}")
        ident = (v.device.type, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride(), dtype)
        if ident not in stored or v.numel() == 0:
            stored[ident] = put(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        meta[key] = {"dtype": dtype, "shape": list(v.shape), "range": stored[ident]}
    return meta


def _get_state(meta: Any, payload: bytes, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(meta, dict):
        raise ValueError(f"quantized model file {str(path)!r} is malformed: float state table is not a mapping")
    state = {}
    for key, m in meta.items():
        try:
            dtype_name, shape = m["dtype"], [int(d) for d in m["shape"]]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"quantized model file {str(path)!r} is malformed: bad entry for {key!r}") from None
        if dtype_name not in _STATE_DTYPES:
            raise ValueError(f"quantized model file {str(path)!r} is malformed: dtype {dtype_name!r} of {key!r}")
        dtype = getattr(torch, dtype_name)
        data = _slice(payload, m["range"], key, path)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if len(data) != itemsize * int(np.prod(shape)):
            raise ValueError(f"quantized model file {str(path)!r} is malformed: {key!r} holds {len(data)} bytes "
                             f"for shape {shape} of {dtype_name}")
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        state[key] = buf.view(dtype).reshape(shape).clone()
    return state


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def fp32_state_bytes(qmodel: QuantizedModel) -> int | None:
    """Size of the equivalent FP32 model's ``torch.save``d state dict (None without shadow weights)."""
    layers = qmodel.quant_layers()
    if any(layer.weight is None for layer in layers.values()):
        return None
    state = {k: v.detach().cpu() for k, v in qmodel.model.state_dict().items()
             if not _is_term_key(k) and ".act." not in f".{k}"}
    return len(_torch_bytes(state))


def save_quantized(qmodel: QuantizedModel, path: str | os.PathLike, *, edges: str = "budget") -> dict[str, Any]:
    """Write ``qmodel`` packed to ``path`` (atomically); returns ``{"path", "bytes", "fp32_state_bytes", "terms"}``.

    ``edges="budget"`` stores each layer's base term, the residual edges the budget bought and any
    edge switched on now; ``edges="all"`` stores every computed edge (bigger file, the whole
    ranking stays available to ``set_residuals`` after loading). The stored ranking is the longest
    prefix of ``edge_order`` whose edges are stored.
    """
    if edges not in ("budget", "all"):
        raise ValueError(f"edges must be 'budget' or 'all', got {edges!r}")
    if not isinstance(qmodel, QuantizedModel):
        raise TypeError(f"qmodel must be a QuantizedModel, got {type(qmodel).__name__}")
    payload = bytearray()

    def put(data: bytes) -> list[int]:
        start = len(payload)
        payload.extend(data)
        return [start, len(data)]

    layers_meta: dict[str, Any] = {}
    layers = qmodel.quant_layers()
    keep_terms = {name: (layer.n_terms if edges == "all" else layer.active_terms) for name, layer in layers.items()}
    if edges == "budget":
        bought = {name: 1 for name in layers}
        for name, _ in qmodel.edge_order[:qmodel.budget_edges]:
            bought[name] += 1
        keep_terms = {name: min(max(keep_terms[name], bought[name]), layers[name].n_terms) for name in layers}
    order: list[list[Any]] = []
    for name, t in qmodel.edge_order:
        if t >= keep_terms.get(name, 0):
            break
        order.append([name, t])
    for name, layer in layers.items():
        layer._refresh()
        sd = str(layer.scale_dtype).removeprefix("torch.")
        terms = []
        for t in range(keep_terms[name]):
            codes, scales = layer.term(t)
            sbytes = scales.detach().cpu().numpy().astype(_SCALE_DTYPES[sd][1]).tobytes()
            terms.append({"codes": put(pack_codes(codes, layer.bits)), "scales": put(sbytes)})
        act = layer.act
        layers_meta[name] = {
            "spec": layer.spec, "bits": layer.bits, "grouping": str(layer.grouping), "method": layer.method,
            "scale_dtype": sd, "active_terms": layer.active_terms, "terms": terms,
            "act": None if act is None else {"bits": act.bits, "method": act.method, "percentile": act.percentile,
                                             "pow2": act.pow2},
        }
    float_meta = _put_state(_float_state(qmodel), put)
    header = {
        "model_spec": qmodel.model_spec, "config": qmodel.config, "layer_info": qmodel.layer_info,
        "edge_order": order, "budget_edges": min(qmodel.budget_edges, len(order)),
        "layers": layers_meta, "float_state": float_meta,
        "payload_bytes": len(payload),
    }
    hbytes = json.dumps(header, sort_keys=True).encode("utf-8")
    body = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(hbytes)) + hbytes + bytes(payload)
    blob = body + _TRAILER.pack(zlib.crc32(body))
    out = write_bytes(path, blob)
    return {"path": str(out), "bytes": len(blob), "fp32_state_bytes": fp32_state_bytes(qmodel),
            "terms": sum(keep_terms.values())}


def _slice(payload: bytes, rng: Any, what: str, path: Path) -> bytes:
    if not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(v, int) and v >= 0 for v in rng)
            and rng[0] + rng[1] <= len(payload)):
        raise ValueError(f"quantized model file {str(path)!r} is malformed: bad byte range for {what}")
    return payload[rng[0]:rng[0] + rng[1]]


def load_quantized(path: str | os.PathLike, model: nn.Module | Callable[[], nn.Module] | None = None, *,
                   map_location: str | torch.device = "cpu") -> QuantizedModel:
    """Rebuild a :class:`QuantizedModel` written by :func:`save_quantized` (module docstring).

    ``model``: an instance of the FP32 architecture the file was converted from (deep-copied, left
    untouched; its weights are not used) or a zero-argument callable returning one. ``None``: the
    file's zoo ``model_spec`` is built (files of non-zoo models need ``model``).
    """
    path = Path(path)
    bad = f"quantized model file {str(path)!r}"
    if not path.is_file():
        raise ValueError(f"{bad} does not exist")
    raw = path.read_bytes()
    if len(raw) < _PREAMBLE.size + _TRAILER.size:
        raise ValueError(f"{bad} is truncated: {len(raw)} bytes, shorter than the {_PREAMBLE.size}-byte preamble "
                         f"and {_TRAILER.size}-byte trailer")
    magic, version, hlen = _PREAMBLE.unpack_from(raw)
    if magic != MAGIC:
        raise ValueError(f"{bad} is not a leantrain quantized model (bad magic bytes {magic!r})")
    if version == 1:
        raise ValueError(f"{bad} has format version 1 (header not checksummed), which this leantrain no longer reads; "
                         "re-export it with save_quantized")
    body, (crc,) = raw[:-_TRAILER.size], _TRAILER.unpack_from(raw, len(raw) - _TRAILER.size)
    if zlib.crc32(body) != crc:
        if _PREAMBLE.size + hlen + _TRAILER.size > len(raw):
            raise ValueError(f"{bad} is truncated or corrupt: header of {hlen} bytes does not fit in {len(raw)} bytes "
                             "(CRC-32 mismatch)")
        raise ValueError(f"{bad} is corrupt: CRC-32 mismatch (the file was truncated, extended or altered)")
    if version != FORMAT_VERSION:
        raise ValueError(f"{bad} has format version {version}; this leantrain reads version {FORMAT_VERSION}")
    if _PREAMBLE.size + hlen > len(body):
        raise ValueError(f"{bad} is malformed: header of {hlen} bytes does not fit in {len(raw)} bytes")
    try:
        header = json.loads(body[_PREAMBLE.size:_PREAMBLE.size + hlen].decode("utf-8"))
        payload_len = int(header["payload_bytes"])
        layers_meta, spec = header["layers"], header["model_spec"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{bad} is malformed: unreadable header ({exc})") from None
    payload = body[_PREAMBLE.size + hlen:]
    if len(payload) != payload_len:
        raise ValueError(f"{bad} is malformed: payload has {len(payload)} bytes, the header says {payload_len}")
    net = _skeleton(model, spec, bad)
    prepare_for_quantization(net)
    for name, meta in layers_meta.items():
        try:
            target = net.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{bad} does not match the model: it has no module {name!r}") from None
        try:
            if QuantLayer.layer_spec(target) != meta["spec"]:
                raise ValueError(f"{bad} does not match the model: layer {name!r} is {QuantLayer.layer_spec(target)} "
                                 f"in the model and {meta['spec']} in the file")
        except AttributeError:
            raise ValueError(f"{bad} does not match the model: {name!r} is a {type(target).__name__}, "
                             "not a linear or convolution layer") from None
        except (KeyError, TypeError):
            raise ValueError(f"{bad} is malformed: layer {name!r} has no valid spec") from None
        try:
            dtype = _SCALE_DTYPES[meta["scale_dtype"]]
            act = None if meta["act"] is None else ActQuantizer(meta["act"]["bits"], method=meta["act"]["method"],
                                                                 percentile=meta["act"]["percentile"], pow2=meta["act"]["pow2"])
            layer = QuantLayer(None, bits=meta["bits"], grouping=meta["grouping"], act=act, method=meta["method"],
                               scale_dtype=dtype[0], spec=meta["spec"])
            numel = int(np.prod(meta["spec"]["shape"]))
            terms = []
            for i, t in enumerate(meta["terms"]):
                codes = unpack_codes(_slice(payload, t["codes"], f"{name} codes {i}", path), numel, meta["bits"])
                sb = _slice(payload, t["scales"], f"{name} scales {i}", path)
                if len(sb) % np.dtype(dtype[1]).itemsize:
                    raise ValueError(f"scales of term {i} are {len(sb)} bytes, not a whole number of {meta['scale_dtype']}")
                scales = torch.from_numpy(np.frombuffer(sb, dtype=dtype[1]).copy()).to(dtype[0])
                terms.append(WeightCodes(codes.reshape(meta["spec"]["shape"]), scales.clone()))
            layer.set_terms(terms)
            layer.active_terms = int(meta["active_terms"])
            replace_submodule(net, name, layer)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            raise ValueError(f"{bad} is malformed: layer {name!r}: {exc}") from None
    state = _get_state(header.get("float_state"), payload, path)
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ValueError(f"{bad} does not match the model: {str(exc).splitlines()[0]}") from None
    missing = [k for k in result.missing_keys if not _is_term_key(k)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{bad} does not match the model: missing {missing}, unexpected {result.unexpected_keys}")
    qmodel = QuantizedModel(net, header.get("config", {}), model_spec=spec, layer_info=header.get("layer_info", {}))
    qmodel.edge_order = [(str(n), int(t)) for n, t in header.get("edge_order", [])]
    qmodel.budget_edges = int(header.get("budget_edges", 0))
    return qmodel.to(map_location).eval()


def _skeleton(model: Any, spec: Any, bad: str) -> nn.Module:
    """The FP32 architecture to load into: a copy of ``model``, ``model()``, or the zoo ``spec``."""
    if isinstance(model, nn.Module):
        return copy.deepcopy(model).cpu().eval()
    if model is not None:
        if not callable(model):
            raise TypeError(f"model must be an nn.Module or a callable returning one, got {type(model).__name__}")
        net = model()
        if not isinstance(net, nn.Module):
            raise TypeError(f"the model builder returned {type(net).__name__}, not an nn.Module")
        return net.cpu().eval()
    if not spec:
        raise ValueError(f"{bad} holds a model outside leantrain's zoo (no model_spec): pass its architecture, "
                         "load_quantized(path, model) with an instance of the FP32 model or a function building one")
    from leantrain.models import build

    try:
        return build(spec["name"], **spec.get("kwargs", {}))
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{bad} has an unusable model_spec {spec!r}: {exc}") from None
