"""Convert a trained FP32 network into a low-bit one: :func:`quantize_model` -> :class:`QuantizedModel`.

Every ``nn.Conv1d``/``nn.Conv2d``/``nn.Linear`` is replaced by a
:class:`~leantrain.quant.layers.QuantLayer` (ternary or k-bit weights with the chosen grouping,
``act_bits``-bit input activations) except the layers named in ``keep`` (by default the first and
the last, which stay FP32 as in most papers of the era) and layers that cannot be converted
(grouped convolutions, non-zero padding modes; the report says why). Batch norm, biases, pooling and
residual additions stay FP32. No gradient step is taken: activation scales come from a few
calibration batches, which are also used to record each layer's input shape for operation counting.

**Operation counting** (per sample, from the real shapes): a layer with ``K`` outputs, reduction
length ``R`` and ``L`` output positions (``H_out * W_out`` for a 2-D conv, 1 for a linear layer on
a vector) does ``MACs = K * R * L`` multiply-accumulates in FP32. With ternary weights each group's
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
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from leantrain.quant.activations import ActQuantizer
from leantrain.quant.grouping import Grouping
from leantrain.quant.layers import MODES, QuantLayer, quantizable

__all__ = ["quantize_model", "QuantizedModel", "LayerReport", "WEIGHT_KINDS", "weight_bits", "calibration_inputs",
           "recalibrate_batchnorm"]

WEIGHT_KINDS: dict[str, int] = {"ternary": 2, "int3": 3, "int4": 4, "int5": 5, "int6": 6, "int7": 7, "int8": 8}


def weight_bits(weights: str) -> int:
    """Bits per weight of a weight kind name (``"ternary"`` = 2, ``"int4"`` = 4, ...)."""
    if weights not in WEIGHT_KINDS:
        raise ValueError(f"weights must be one of {sorted(WEIGHT_KINDS)}, got {weights!r}")
    return WEIGHT_KINDS[weights]


def calibration_inputs(calibration: Any, *, batches: int = 8, batch_size: int = 128) -> list[torch.Tensor]:
    """Up to ``batches`` input tensors from a tensor, a Dataset, a DataLoader or an iterable of batches.

    A batch that is a tuple/list contributes its first element (the inputs); a Dataset is cut into
    consecutive batches of ``batch_size`` samples from its start (deterministic).
    """
    if batches < 1:
        raise ValueError(f"calibration batches must be >= 1, got {batches}")
    if calibration is None:
        raise ValueError("calibration data is required (a few batches of inputs: a tensor, Dataset or DataLoader)")
    if isinstance(calibration, torch.Tensor):
        return [calibration]
    if isinstance(calibration, Dataset) and not isinstance(calibration, DataLoader):
        n = min(len(calibration), batches * batch_size)  # type: ignore[arg-type]
        if isinstance(calibration, TensorDataset):
            x = calibration.tensors[0][:n]
        else:
            x = torch.stack([calibration[i][0] for i in range(n)])
        return [x[i:i + batch_size] for i in range(0, n, batch_size)]
    if not isinstance(calibration, Iterable):
        raise TypeError("calibration must be a Tensor, Dataset, DataLoader or iterable of batches, "
                        f"got {type(calibration).__name__}")
    out = []
    for batch in calibration:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"calibration batches must hold tensors, got {type(x).__name__}")
        out.append(x)
        if len(out) >= batches:
            break
    if not out:
        raise ValueError("calibration data is empty")
    return out


@dataclass
class LayerReport:
    """One row of the per-layer report (counts are per sample; memory in bytes)."""

    name: str
    kind: str
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

    Attributes: ``model`` (the module tree with :class:`QuantLayer`s), ``config`` (conversion
    options), ``model_spec`` (to rebuild the architecture when loading a packed file),
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
        self.calibration_sample: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

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
                    name, info["kind"], list(shape), "quantized", str(layer.grouping), layer.bits,
                    layer.act.bits if layer.act is not None else 32, terms, lay.G, float(scales.min()),
                    float(scales.mean()), float(scales.max()), layer.weight_error(), macs, mults, replaced, 4 * numel, mem))
            else:
                rows.append(LayerReport(name, info["kind"], list(shape), f"kept FP32 ({info['reason']})", "-", 32, 32, 1, 0,
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
        head = (f"{'layer':<22} {'shape':<16} {'grouping':<14} {'w':>2} {'a':>2} {'t':>2} {'groups':>6} "
                f"{'scale mean':>10} {'rel err':>8} {'MACs':>9} {'mults':>9} {'replaced':>8} {'KiB fp32':>9} {'KiB q':>8}")
        lines = [head, "-" * len(head)]
        for r in self.report():
            grouping = r.grouping if r.status == "quantized" else "kept FP32"
            scale = "-" if math.isnan(r.scale_mean) else f"{r.scale_mean:.4g}"
            lines.append(
                f"{r.name:<22} {'x'.join(map(str, r.shape)):<16} {grouping:<14} {r.weight_bits:>2} {r.act_bits:>2} {r.terms:>2} "
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
def recalibrate_batchnorm(model: nn.Module, batches: Sequence[torch.Tensor], *, device: str | torch.device = "cpu") -> int:
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
            model(x.to(device))
    finally:
        for bn, mom in zip(bns, saved):
            bn.momentum = mom
            bn.eval()
        model.train(was_training)
    return len(bns)


def _resolve_keep(names: list[str], keep: Sequence[str] | str | None) -> dict[str, str]:
    if keep is None:
        return {}
    if isinstance(keep, str):
        keep = [keep]
    out: dict[str, str] = {}
    for k in keep:
        if k == "first" and names:
            out[names[0]] = "first layer"
        elif k == "last" and names:
            out[names[-1]] = "last layer"
        elif k in names:
            out[k] = "kept by request"
        elif k not in ("first", "last"):
            raise ValueError(f"keep entry {k!r} is not 'first', 'last' or a layer name; layers are {names}")
    return out


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


@torch.no_grad()
def _record_positions(model: nn.Module, names: Iterable[str], x: torch.Tensor) -> dict[str, int]:
    """Output positions per sample (``L``) of each named layer, from one forward pass."""
    positions: dict[str, int] = {}
    handles = []
    for name in names:
        mod = model.get_submodule(name)

        def hook(m: nn.Module, inp: Any, out: torch.Tensor, name: str = name) -> None:
            positions[name] = math.prod(out.shape[2:]) if out.dim() > 2 and not _is_linear(m) else math.prod(out.shape[1:-1])

        handles.append(mod.register_forward_hook(hook))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return positions


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, QuantLayer) and m.spec["kind"] == "linear")


def quantize_model(
    model: nn.Module,
    *,
    weights: str = "ternary",
    grouping: str | Grouping = "fgq:4",
    act_bits: int | None = 8,
    calibration: Any = None,
    keep: Sequence[str] | str | None = ("first", "last"),
    act_method: str = "minmax",
    percentile: float = 99.99,
    act_pow2: bool = False,
    method: str = "optimal",
    scale_dtype: torch.dtype = torch.float32,
    calibration_batches: int = 8,
    model_spec: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    bn_recalibration: bool = False,
) -> QuantizedModel:
    """Convert ``model`` (left untouched) to a :class:`QuantizedModel` (module docstring).

    Args:
        weights: ``"ternary"`` (2-bit {-a, 0, a}), ``"int4"``, ``"int8"`` (or int3..int7).
        grouping: which weights share a scale: ``"fgq:N"``, ``"cluster:N"``, ``"channel"``, ``"tensor"``
            (``":partial"`` suffix for the stated remainder rule); see :mod:`leantrain.quant.grouping`.
        act_bits: bits of the input activations of converted layers (None: not quantized).
        calibration: a few batches of inputs (tensor, Dataset, DataLoader, iterable of batches).
        keep: layers left FP32: ``"first"``, ``"last"`` and/or module names.
        act_method / percentile / act_pow2: activation calibration, see :class:`ActQuantizer`.
        method: ternary solver, ``"optimal"`` (exact, default) or ``"threshold"`` (0.7*mean rule).
        scale_dtype: dtype in which weight scales are stored (float32 or float16); a float16 model
            computes with the float16-rounded scales, so its packed file reloads bit-identically.
        model_spec: ``leantrain.models.model_spec(...)`` of the architecture (needed by ``save_quantized``).
        bn_recalibration: re-estimate batch-norm running statistics of the converted network on the
            calibration batches (:func:`recalibrate_batchnorm`; no gradient step, weights untouched).
            Off by default: the papers' conversion keeps the FP32 statistics.
    """
    bits = weight_bits(weights)
    grouping = Grouping.parse(grouping)
    batches = calibration_inputs(calibration, batches=calibration_batches)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    qnet = copy.deepcopy(model).to(device).eval()
    candidates = [n for n, m in qnet.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    if not candidates:
        raise ValueError("model has no Conv1d/Conv2d/Linear layer to quantize")
    kept = _resolve_keep(candidates, keep)
    layer_info: dict[str, dict[str, Any]] = {}
    for name in candidates:
        mod = qnet.get_submodule(name)
        reason = kept.get(name) or quantizable(mod)
        kind = "linear" if isinstance(mod, nn.Linear) else f"conv{mod.weight.dim() - 2}d"
        layer_info[name] = {"kind": kind, "shape": list(mod.weight.shape)}
        if reason:
            layer_info[name]["reason"] = reason
            continue
        act = ActQuantizer(act_bits, method=act_method, percentile=percentile, pow2=act_pow2) if act_bits else None
        try:
            qlayer = QuantLayer(mod, bits=bits, grouping=grouping, act=act, method=method, scale_dtype=scale_dtype)
        except ValueError as exc:
            raise ValueError(f"layer {name!r}: {exc}") from None
        _set_submodule(qnet, name, qlayer.to(device))
    config = {"weights": weights, "bits": bits, "grouping": str(grouping), "act_bits": act_bits, "keep": list(kept),
              "act_method": act_method, "percentile": percentile, "act_pow2": act_pow2, "method": method,
              "scale_dtype": str(scale_dtype).removeprefix("torch."), "bn_recalibration": bool(bn_recalibration)}
    qmodel = QuantizedModel(qnet, config, model_spec=model_spec, layer_info=layer_info)
    qmodel.eval()
    acts = [m for m in qnet.modules() if isinstance(m, ActQuantizer)]
    with torch.no_grad():
        for a in acts:
            a.start_calibration()
        if bn_recalibration:
            recalibrate_batchnorm(qnet, batches, device=device)
            for a in acts:
                a.start_calibration()  # ranges after the new statistics
        for x in batches:
            qnet(x.to(device))
        for a in acts:
            a.finish_calibration()
    for name, pos in _record_positions(qnet, candidates, batches[0][:1].to(device)).items():
        layer_info[name]["positions"] = pos
    qmodel.calibration_sample = batches[0][:128].detach().clone()
    return qmodel
