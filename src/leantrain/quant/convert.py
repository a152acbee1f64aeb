"""Convert a trained FP32 network into a low-bit one: :func:`quantize_model` -> :class:`QuantizedModel`.

Every candidate layer (``nn.Conv1d``/``nn.Conv2d``/``nn.Linear``, transformers' ``Conv1D``, the
projections of ``nn.MultiheadAttention``; :mod:`leantrain.quant.selection`) is replaced by a
:class:`~leantrain.quant.layers.QuantLayer` (ternary or k-bit weights with the chosen grouping,
quantized input activations) except the layers selected by ``config.keep`` (by default ``first`` and
``last``, which stay FP32 as in most papers of the era; defined by data flow, see
:mod:`leantrain.quant.selection`) and layers that cannot be converted (grouped convolutions,
non-zero padding modes, 3-D convolutions; the report says why). Embedding lookups, normalisation, biases, pooling, softmax and
residual additions stay FP32. No gradient step is taken: activation scales come from a few
calibration batches, which are also used to record each layer's input shape for operation counting.

**Operation counting** (per sample, from the real shapes): a layer with ``K`` outputs, reduction
length ``R`` and ``L`` output positions per sample (``H_out * W_out`` for a 2-D conv, 1 for a
linear layer on a vector, the sequence length for a linear layer on a token sequence) does
``MACs = K * R * L`` multiply-accumulates in FP32. With ternary weights each group's
partial sum ``sum_{i in g} T_i x_i`` needs only additions/subtractions and one multiplication by its
scale, so per term ``scale_mults = K * S * L`` multiplications remain (``S = ceil(R/N)`` segments per
row for ``fgq:N``, ``S = 1`` for clusters, per channel and per tensor) and the fraction of
multiplications replaced by additions is ``1 - terms * scale_mults / MACs`` (``1 - 1/N`` for FGQ
when N divides R). k-bit weights keep ``MACs`` (low-bit integer) multiplications: 0% replaced.
Kept FP32 layers replace nothing. The model-level fraction is ``sum (MACs - remaining mults) /
sum MACs`` over all counted layers.

**Weight memory**: FP32 ``4 * numel`` bytes; quantized ``terms * (numel * b / 8 + G * scale_bytes)``
with ``b = 2`` for ternary and ``b = bits`` otherwise (the packed file stores 3-bit codes in 4-bit
slots and 5..7-bit codes in bytes; see :mod:`leantrain.quant.packed`). Biases are not counted.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from leantrain.quant.activations import ActQuantizer
from leantrain.quant.attention import prepare_for_quantization
from leantrain.quant.config import WEIGHT_KINDS, QuantConfig, weight_bits
from leantrain.quant.layers import MODES, QuantLayer, quantizable
from leantrain.quant.selection import candidates, dataflow_groups, resolve_keep, roles

__all__ = ["quantize_model", "QuantizedModel", "LayerReport", "WEIGHT_KINDS", "weight_bits", "calibration_inputs",
           "calibration_batches", "Batch", "recalibrate_batchnorm", "replace_submodule"]

@dataclass
class Batch:
    """One calibration call: ``model(*args, **kwargs)``; ``batch_size`` is the leading size of its first tensor."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def batch_size(self) -> int:
        for v in (*self.args, *self.kwargs.values()):
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return int(v.shape[0])
        return 1

    def to(self, device: str | torch.device) -> Batch:
        def mv(v: Any) -> Any:
            return v.to(device) if isinstance(v, torch.Tensor) else v
        return Batch(tuple(mv(a) for a in self.args), {k: mv(v) for k, v in self.kwargs.items()})

    def head(self, n: int) -> Batch:
        """The first ``n`` samples (tensors sliced along their leading dimension)."""
        b = self.batch_size

        def cut(v: Any) -> Any:
            return v[:n].detach().clone() if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b else v
        return Batch(tuple(cut(a) for a in self.args), {k: cut(v) for k, v in self.kwargs.items()})

    def __call__(self, model: nn.Module) -> Any:
        return model(*self.args, **self.kwargs)


def _as_batch(item: Any) -> Batch:
    if isinstance(item, Batch):
        return item
    if isinstance(item, torch.Tensor):
        return Batch((item,), {})
    if isinstance(item, Mapping):  # keyword inputs, e.g. a tokenizer's BatchEncoding
        return Batch((), dict(item))
    if isinstance(item, (tuple, list)) and item:
        first = item[0]  # (inputs, targets) pairs: the inputs
        return Batch((), dict(first)) if isinstance(first, Mapping) else Batch((first,), {})
    raise TypeError(f"calibration batches must be tensors, mappings of keyword inputs or (inputs, targets) pairs, "
                    f"got {type(item).__name__}")


def calibration_batches(calibration: Any, *, batches: int = 8, batch_size: int = 128) -> list[Batch]:
    """Up to ``batches`` calibration calls from a tensor, a mapping of keyword inputs, a Dataset, a DataLoader or an
    iterable of batches.

    A tensor is one positional input; a mapping (``{"input_ids": ..., "attention_mask": ...}``) is
    keyword inputs; a batch that is a tuple/list contributes its first element (the inputs of an
    ``(inputs, targets)`` pair); a Dataset is cut into consecutive batches of ``batch_size`` samples
    from its start (deterministic).
    """
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"calibration batches must be an integer >= 1, got {batches!r}")
    if calibration is None:
        raise ValueError("calibration data is required (a few batches of inputs: a tensor, a mapping of keyword "
                         "inputs, a Dataset or a DataLoader)")
    if isinstance(calibration, (torch.Tensor, Mapping, Batch)):
        return [_as_batch(calibration)]
    if isinstance(calibration, Dataset) and not isinstance(calibration, DataLoader):
        n = min(len(calibration), batches * batch_size)  # type: ignore[arg-type]
        if isinstance(calibration, TensorDataset):
            x = calibration.tensors[0][:n]
        else:
            x = torch.stack([calibration[i][0] for i in range(n)])
        return [Batch((x[i:i + batch_size],), {}) for i in range(0, n, batch_size)]
    if not isinstance(calibration, Iterable):
        raise TypeError("calibration must be a Tensor, a mapping, a Dataset, a DataLoader or an iterable of batches, "
                        f"got {type(calibration).__name__}")
    out = []
    for batch in calibration:
        out.append(_as_batch(batch))
        if len(out) >= batches:
            break
    if not out:
        raise ValueError("calibration data is empty")
    return out


def calibration_inputs(calibration: Any, *, batches: int = 8, batch_size: int = 128) -> list[torch.Tensor]:
    """Like :func:`calibration_batches`, for models that take one tensor: the input tensors."""
    out = []
    for b in calibration_batches(calibration, batches=batches, batch_size=batch_size):
        if b.kwargs or len(b.args) != 1 or not isinstance(b.args[0], torch.Tensor):
            raise TypeError("this function needs calibration batches of one input tensor each")
        out.append(b.args[0])
    return out


@dataclass
class LayerReport:
    """One row of the per-layer report (counts are per sample; memory in bytes)."""

    name: str
    kind: str
    role: str
    shape: list[int]
    status: str
    grouping: str
    weight_bits: int
    act_bits: int
    terms: int
    groups: int
    scale_min: float
    scale_mean: float
    scale_max: float
    rel_error: float
    macs: int
    mults: int
    mults_replaced: float
    mem_fp32_bytes: int
    mem_quant_bytes: float


def _layer_counts(kind: str, shape: Sequence[int], positions: int) -> int:
    return int(shape[0]) * math.prod(int(s) for s in shape[1:]) * int(positions)


class QuantizedModel(nn.Module):
    """A converted network: runs as a normal ``nn.Module``; ``report()`` describes every layer.

    ``forward(*args, **kwargs)`` calls the converted module tree with exactly the arguments given and
    returns whatever it returns (a tensor, a tuple, a Hugging Face ``ModelOutput``).

    Attributes: ``model`` (the module tree with :class:`QuantLayer`s), ``config`` (the
    :class:`~leantrain.quant.config.QuantConfig` as a dict, ``to_dict()`` form), ``model_spec``
    (zoo models: rebuilds the architecture when loading a packed file without a model),
    ``edge_order`` (ranked residual edges ``(layer, term)``, see :mod:`leantrain.quant.residual`),
    ``budget_edges`` (how many of them the budget bought).
    """

    def __init__(self, model: nn.Module, config: dict[str, Any], *, model_spec: dict[str, Any] | None = None,
                 layer_info: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.model = model
        self.config = dict(config)
        self.model_spec = model_spec
        self.layer_info: dict[str, dict[str, Any]] = layer_info or {}
        self.edge_order: list[tuple[str, int]] = []
        self.budget_edges = 0
        self.calibration_sample: Batch | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    # -- layers -----------------------------------------------------------------------------------
    def quant_layers(self) -> dict[str, QuantLayer]:
        """Converted layers by module name (in module order)."""
        return {n: m for n, m in self.model.named_modules() if isinstance(m, QuantLayer)}

    def layer(self, name: str) -> QuantLayer:
        layers = self.quant_layers()
        if name not in layers:
            raise ValueError(f"no quantized layer {name!r}; layers are {list(layers)}")
        return layers[name]

    def set_mode(self, mode: str) -> QuantizedModel:
        """``"fake"`` (quantize-dequantize), ``"integer"`` (integer operands) or ``"float"`` (FP32 reference)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        for layer in self.quant_layers().values():
            layer.mode = mode
        return self

    @torch.no_grad()
    def path_agreement(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Run the fake-quant and the integer path on the same inputs and compare them end to end.

        Returns ``{"layers": {name: {"codes", "flipped", "max_code_diff"}}, "flip_rate", "max_code_diff",
        "max_abs_diff", "rel_diff"}``: for every quantized layer with quantized inputs, how many input
        activation codes it computed in each mode and how many differ (a tiny float difference
        upstream moves a value across a rounding boundary), and the outputs' largest absolute
        difference and ``||int - fake|| / ||fake||`` (over all output tensors). The mode is restored.
        """
        layers = {n: m for n, m in self.quant_layers().items() if m.act is not None}
        modes = {n: m.mode for n, m in self.quant_layers().items()}
        seen: dict[str, list[torch.Tensor]] = {}

        def hook(m: nn.Module, inp: Any, name: str) -> None:
            seen.setdefault(name, []).append(m.act.levels(inp[0]).detach())

        outs = []
        for mode in ("fake", "integer"):
            handles = [m.register_forward_pre_hook(lambda m, inp, name=n: hook(m, inp, name)) for n, m in layers.items()]
            try:
                self.set_mode(mode)
                outs.append([t.detach().float() for t in _tensors(self.model(*args, **kwargs))])
            finally:
                for h in handles:
                    h.remove()
        for n, m in self.quant_layers().items():
            m.mode = modes[n]
        per: dict[str, dict[str, int]] = {}
        for n, codes in seen.items():
            half = len(codes) // 2
            diff = [(a - b).abs() for a, b in zip(codes[:half], codes[half:])]
            per[n] = {"codes": sum(d.numel() for d in diff), "flipped": int(sum(int((d > 0).sum()) for d in diff)),
                      "max_code_diff": int(max((float(d.max()) for d in diff if d.numel()), default=0.0))}
        total = sum(v["codes"] for v in per.values())
        num = sum(float((a - b).double().square().sum()) for a, b in zip(*outs))
        den = sum(float(a.double().square().sum()) for a in outs[0])
        return {"layers": per, "flip_rate": sum(v["flipped"] for v in per.values()) / total if total else 0.0,
                "max_code_diff": max((v["max_code_diff"] for v in per.values()), default=0),
                "max_abs_diff": max((float((a - b).abs().max()) for a, b in zip(*outs) if a.numel()), default=0.0),
                "rel_diff": (num / den) ** 0.5 if den else 0.0}

    # -- residual edges ---------------------------------------------------------------------------
    def set_residuals(self, k: int) -> None:
        """Switch on the ``k`` most important residual edges of ``edge_order`` and off all others.

        ``k = 0`` restores the plain 8-2 model exactly; ``k = budget_edges`` is what the budget
        bought; ``k = len(edge_order)`` uses every computed edge. No re-conversion happens.
        """
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(self.edge_order):
            raise ValueError(f"k must be an integer in [0, {len(self.edge_order)}] (number of ranked edges), got {k!r}")
        layers = self.quant_layers()
        active = {name: 1 for name in layers}
        for name, _ in self.edge_order[:k]:
            active[name] += 1
        for name, layer in layers.items():
            layer.active_terms = min(active[name], layer.n_terms)

    @property
    def residuals_on(self) -> int:
        """Number of residual edges currently switched on (over all layers)."""
        return sum(layer.active_terms - 1 for layer in self.quant_layers().values())

    # -- report -----------------------------------------------------------------------------------
    def report(self) -> list[LayerReport]:
        """One :class:`LayerReport` per counted layer (quantized and kept), in module order."""
        rows: list[LayerReport] = []
        quant = self.quant_layers()
        for name, info in self.layer_info.items():
            shape = info["shape"]
            numel = math.prod(shape)
            macs = _layer_counts(info["kind"], shape, info.get("positions", 0))
            if name in quant:
                layer = quant[name]
                lay, terms = layer.layout, layer.active_terms
                scale_mults = lay.K * lay.segments * int(info.get("positions", 0)) * terms
                scales = layer.term(0).scales.float()
                if layer.bits == 2:
                    mults, replaced = scale_mults, (1.0 - scale_mults / macs) if macs else 0.0
                else:
                    mults, replaced = macs + scale_mults, 0.0
                scale_bytes = torch.finfo(layer.scale_dtype).bits / 8
                mem = terms * (numel * layer.bits / 8 + lay.G * scale_bytes)
                rows.append(LayerReport(
                    name, info["kind"], info.get("role", "other"), list(shape), "quantized", str(layer.grouping), layer.bits,
                    layer.act.bits if layer.act is not None else 32, terms, lay.G, float(scales.min()),
                    float(scales.mean()), float(scales.max()), layer.weight_error(), macs, mults, replaced, 4 * numel, mem))
            else:
                rows.append(LayerReport(name, info["kind"], info.get("role", "other"), list(shape),
                                        f"kept FP32 ({info['reason']})", "-", 32, 32, 1, 0,
                                        math.nan, math.nan, math.nan, 0.0, macs, macs, 0.0, 4 * numel, 4.0 * numel))
        return rows

    def summary(self) -> dict[str, Any]:
        """Model totals: MACs, remaining multiplications, fraction replaced, weight memory."""
        rows = self.report()
        macs = sum(r.macs for r in rows)
        replaced = sum(r.macs * r.mults_replaced for r in rows)
        qrows = [r for r in rows if r.status == "quantized"]
        qmacs = sum(r.macs for r in qrows)
        return {
            "layers": len(rows), "quantized_layers": len(qrows), "macs": macs,
            "mults_replaced": replaced / macs if macs else 0.0,
            "mults_replaced_quantized_layers": (sum(r.macs * r.mults_replaced for r in qrows) / qmacs) if qmacs else 0.0,
            "mem_fp32_bytes": sum(r.mem_fp32_bytes for r in rows),
            "mem_quant_bytes": sum(r.mem_quant_bytes for r in rows),
            "residual_edges_on": self.residuals_on,
        }

    def format_report(self) -> str:
        """The per-layer report as an aligned text table, with totals."""
        rows = self.report()
        nw = max([22, *(len(r.name) for r in rows)])
        head = (f"{'layer':<{nw}} {'role':<9} {'shape':<16} {'grouping':<14} {'w':>2} {'a':>2} {'t':>2} {'groups':>6} "
                f"{'scale mean':>10} {'rel err':>8} {'MACs':>9} {'mults':>9} {'replaced':>8} {'KiB fp32':>9} {'KiB q':>8}")
        lines = [head, "-" * len(head)]
        for r in rows:
            grouping = r.grouping if r.status == "quantized" else "kept FP32"
            scale = "-" if math.isnan(r.scale_mean) else f"{r.scale_mean:.4g}"
            lines.append(
                f"{r.name:<{nw}} {r.role:<9} {'x'.join(map(str, r.shape)):<16} {grouping:<14} {r.weight_bits:>2} "
                f"{r.act_bits:>2} {r.terms:>2} "
                f"{r.groups:>6} {scale:>10} {r.rel_error:>8.4f} {r.macs:>9} {r.mults:>9} {100 * r.mults_replaced:>7.1f}% "
                f"{r.mem_fp32_bytes / 1024:>9.1f} {r.mem_quant_bytes / 1024:>8.2f}")
        s = self.summary()
        lines.append("-" * len(head))
        lines.append(f"total: {s['macs']} MACs/sample, {100 * s['mults_replaced']:.1f}% of multiplications replaced by "
                     f"additions ({100 * s['mults_replaced_quantized_layers']:.1f}% in quantized layers); weights "
                     f"{s['mem_fp32_bytes'] / 1024:.1f} KiB FP32 -> {s['mem_quant_bytes'] / 1024:.2f} KiB; "
                     f"residual edges on: {s['residual_edges_on']}")
        return "\n".join(lines)

    def report_dicts(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.report()]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Sequence[Any], *, device: str | torch.device = "cpu") -> int:
    """Replace every batch-norm layer's running mean/variance by their values on ``batches``.

    Quantized weights shift each channel's pre-normalisation mean and variance; the FP32 running
    statistics then mis-normalise (small networks with few channels per layer suffer most). This
    sets ``running_mean``/``running_var`` to the cumulative average of the per-batch statistics
    (``momentum=None``) of the converted network over ``batches``, with everything else in eval
    mode. No gradient step; affine parameters untouched. Returns the number of layers updated.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    was_training = model.training
    model.eval()
    saved = []
    for bn in bns:
        saved.append(bn.momentum)
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        for x in batches:
            _as_batch(x).to(device)(model)
    finally:
        for bn, mom in zip(bns, saved):
            bn.momentum = mom
            bn.eval()
        model.train(was_training)
    return len(bns)


def replace_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in ``root`` at the dotted path ``name`` (which must name an existing parent)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def quantize_model(model: nn.Module, config: QuantConfig | None = None, *, calibration: Any = None,
                   model_spec: dict[str, Any] | None = None, device: str | torch.device | None = None,
                   **kwargs: Any) -> QuantizedModel:
    """Convert ``model`` (left untouched) to a :class:`QuantizedModel` as ``config`` says (module docstring).

    Args:
        model: any ``nn.Module`` (leantrain's zoo, torchvision/timm CNNs, Hugging Face transformers,
            ``nn.TransformerEncoder``, ...).
        config: a :class:`~leantrain.quant.config.QuantConfig`. Instead of it, the keyword form of
            :meth:`QuantConfig.from_kwargs <leantrain.quant.config.QuantConfig.from_kwargs>` may be used
            (``weights="ternary"|"int4"|..., grouping="fgq:4", act_bits=8, keep=("first", "last"),
            act_method, percentile, act_pow2, method, scale_dtype, calibration_batches,
            bn_recalibration``): a thin spelling of the same config. Giving both raises TypeError.
        calibration: a few batches of inputs: a tensor, a mapping of keyword inputs
            (``{"input_ids": ..., "attention_mask": ...}``), a Dataset, a DataLoader or an iterable
            of any of these (:func:`calibration_batches`).
        model_spec: ``leantrain.models.model_spec(...)`` of a zoo architecture, so that
            ``load_quantized(path)`` can rebuild it alone; other models are rebuilt from the instance
            passed to ``load_quantized(path, model)``.
        device: where the converted model lives (default: the model's).

    Conversion: ``nn.MultiheadAttention`` projections become modules and torch's fused transformer
    fast path is switched off (:mod:`leantrain.quant.attention`); every candidate layer
    (:mod:`leantrain.quant.selection`) not selected by ``config.keep`` and convertible becomes a
    :class:`QuantLayer`; activation scales are calibrated on the calibration batches.
    """
    if config is None:
        if "scale_dtype" in kwargs and isinstance(kwargs["scale_dtype"], torch.dtype):
            kwargs["scale_dtype"] = str(kwargs["scale_dtype"]).removeprefix("torch.")
        try:
            config = QuantConfig.from_kwargs(**kwargs)
        except TypeError as exc:
            raise TypeError(f"quantize_model: {exc}") from None
    elif kwargs:
        raise TypeError(f"pass either config= or the keyword form, not both (got config and {sorted(kwargs)})")
    elif not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    batches = calibration_batches(calibration, batches=config.calibration_batches)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    qnet = copy.deepcopy(model).to(device).eval()
    unsupported = prepare_for_quantization(qnet)
    cands = candidates(qnet)
    if not cands:
        raise ValueError("model has no Linear/Conv1d/Conv2d layer (or transformers Conv1D) to quantize")
    role_of = roles(qnet, cands)
    probe = batches[0].to(device)
    first, last, positions = dataflow_groups(qnet, cands, lambda: probe(qnet), batch_size=probe.batch_size)
    kept = resolve_keep(cands, config.keep, role_of, first, last)
    w, a = config.weights, config.activations
    layer_info: dict[str, dict[str, Any]] = {}
    for name in cands:
        mod = qnet.get_submodule(name)
        reason = kept.get(name) or quantizable(mod)
        spec = QuantLayer.layer_spec(mod) if not quantizable(mod) else None
        kind = spec["kind"] if spec else f"conv{mod.weight.dim() - 2}d"
        shape = spec["shape"] if spec else list(mod.weight.shape)
        layer_info[name] = {"kind": kind, "role": role_of[name], "shape": shape, "positions": positions.get(name, 0)}
        if reason:
            layer_info[name]["reason"] = reason
            continue
        act = ActQuantizer(a.bits, method=a.method, percentile=a.percentile, pow2=a.pow2) if a is not None else None
        try:
            qlayer = QuantLayer(mod, bits=w.bits, grouping=w.grouping, act=act, method=w.method,
                                scale_dtype=getattr(torch, w.scale_dtype))
        except ValueError as exc:
            raise ValueError(f"layer {name!r}: {exc}") from None
        replace_submodule(qnet, name, qlayer.to(device))
    for name, reason in unsupported.items():
        layer_info[f"{name}.in_proj_weight"] = {"kind": "linear", "role": "attention", "reason": reason,
                                                "shape": [3 * qnet.get_submodule(name).embed_dim,
                                                          qnet.get_submodule(name).embed_dim], "positions": 0}
    qmodel = QuantizedModel(qnet, config.to_dict(), model_spec=model_spec, layer_info=layer_info)
    qmodel.eval()
    acts = [m for m in qnet.modules() if isinstance(m, ActQuantizer)]
    with torch.no_grad():
        for q in acts:
            q.start_calibration()
        if config.bn_recalibration:
            recalibrate_batchnorm(qnet, batches, device=device)
            for q in acts:
                q.start_calibration()  # ranges after the new statistics
        for b in batches:
            b.to(device)(qnet)
        for q in acts:
            q.finish_calibration()
    qmodel.calibration_sample = batches[0].head(128)
    return qmodel


def _tensors(out: Any) -> list[torch.Tensor]:
    """Every floating-point tensor of a model output (tensor, tuple/list, dict or ModelOutput), in order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []
