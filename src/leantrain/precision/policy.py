"""Precision policies: which tensor of which GEMM is rounded to which format, and how.

A linear or convolution layer runs three GEMMs per training step::

    forward          Y  = X  (x) W        inputs: activation X, weight W
    backward-data    dX = dY (x) W^T      inputs: output gradient dY, weight W
    backward-weight  dW = X^T (x) dY      inputs: activation X, output gradient dY

A :class:`Policy` names, for each of the six GEMM inputs, an operand format (:class:`FloatSpec`,
:class:`DFPSpec`, or ``None`` = left FP32) and says how products are accumulated (FP32, or an
:class:`IntAccumulator` for integer DFP GEMMs). Everything else stays FP32, as the BF16 paper
(arXiv:1905.12322) and the DFP16 paper (arXiv:1802.00930) keep it: the bias add, normalization
layers (statistics and affine), activation functions, pooling, residual adds, softmax and loss, the
master weights and the optimizer update. Two optional ablations round the *stored* master weights
(``master_weights``) or the optimizer state (``optimizer_state``) after every update.

Named policies (:data:`POLICIES`, :func:`get_policy`): ``fp32``, ``bf16``, ``bf16-sr``,
``bf16-trunc``, ``fp16``, ``fp16-scaled``, ``fp8``, ``dfp16``. All roundings are done by the one
rounding routine of the project, :func:`leantrain.numerics.quantize` (float formats) and
:func:`leantrain.numerics.to_dfp` (DFP).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from leantrain.numerics import BF16, FP8_E4M3, FP8_E5M2, FP16, FloatFormat, safe_chunk

__all__ = [
    "FloatSpec",
    "DFPSpec",
    "OperandSpec",
    "Gemm",
    "IntAccumulator",
    "DynamicLossScaling",
    "Policy",
    "POLICIES",
    "get_policy",
    "policy_names",
]

ROUNDINGS = ("nearest", "stochastic", "truncate")
FP32_OPS = (
    "bias add (bias and its gradient FP32, added to the FP32 GEMM output)",
    "normalization layers (BatchNorm/LayerNorm/GroupNorm statistics and affine)",
    "activation functions, pooling, dropout, residual adds",
    "elementwise products (gates, masks, attention scale), recurrent-cell nonlinearities",
    "softmax and loss",
    "master weights, optimizer state and the weight update",
)


def _check_rounding(rounding: str, what: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"{what} must be one of {ROUNDINGS}, got {rounding!r}")


@dataclass(frozen=True)
class FloatSpec:
    """Round a GEMM input to the float format ``format`` with ``rounding``.

    ``rounding``: ``"nearest"`` (to nearest, ties to even), ``"stochastic"`` (up with probability
    equal to the fractional distance to the lower neighbour) or ``"truncate"`` (toward zero).
    ``scaling="tensor"`` first multiplies the tensor by the power of two
    ``s = 2**floor(log2(format_max / amax))`` (``amax`` = max |x| over the tensor; ``s = 1`` when
    ``amax`` is 0 or not finite), rounds, and divides by ``s`` again: per-tensor scaling as FP8
    training uses it. Because ``s`` is a power of two both multiplications are exact in FP32.
    NaN/Inf/signed-zero/subnormal/overflow behaviour is that of :func:`leantrain.numerics.quantize`.
    """

    format: FloatFormat
    rounding: str = "nearest"
    scaling: Literal["none", "tensor"] = "none"

    def __post_init__(self) -> None:
        if not isinstance(self.format, FloatFormat):
            raise TypeError(f"format must be a leantrain.numerics.FloatFormat, got {type(self.format).__name__}")
        _check_rounding(self.rounding, "rounding")
        if self.scaling not in ("none", "tensor"):
            raise ValueError(f"scaling must be 'none' or 'tensor', got {self.scaling!r}")

    @property
    def label(self) -> str:
        name = getattr(self.format, "name", None) or f"E{self.format.exp_bits}M{self.format.man_bits}"
        return f"{name}/{self.rounding}" + ("/scaled" if self.scaling == "tensor" else "")


@dataclass(frozen=True)
class DFPSpec:
    """Convert a GEMM input to dynamic fixed point: ``bits``-bit signed integers and one shared
    power-of-two exponent per tensor, recomputed at every conversion (:func:`leantrain.numerics.to_dfp`
    states the exponent rule), with ``rounding`` ``"nearest"`` or ``"stochastic"``."""

    bits: int = 16
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 24:
            raise ValueError(f"bits must be an int in [2, 24], got {self.bits!r}")
        if self.rounding not in ("nearest", "stochastic"):
            raise ValueError(f"rounding must be 'nearest' or 'stochastic' for DFP, got {self.rounding!r}")

    @property
    def label(self) -> str:
        return f"DFP{self.bits}/{self.rounding}"


OperandSpec = FloatSpec | DFPSpec | None


def _label(spec: OperandSpec) -> str:
    return "FP32" if spec is None else spec.label


@dataclass(frozen=True)
class Gemm:
    """Formats of the two inputs of one GEMM (``None`` = FP32, not rounded)."""

    a: OperandSpec = None
    b: OperandSpec = None

    def __post_init__(self) -> None:
        for name, spec in (("a", self.a), ("b", self.b)):
            if spec is not None and not isinstance(spec, FloatSpec | DFPSpec):
                raise TypeError(f"Gemm.{name} must be FloatSpec, DFPSpec or None, got {type(spec).__name__}")
        if (isinstance(self.a, DFPSpec)) != (isinstance(self.b, DFPSpec)):
            raise ValueError("an integer (DFP) GEMM needs both inputs in DFP: got "
                             f"a={_label(self.a)}, b={_label(self.b)}")

    @property
    def integer(self) -> bool:
        return isinstance(self.a, DFPSpec)

    @property
    def rounds(self) -> bool:
        return self.a is not None or self.b is not None


GEMM_NAMES = ("forward", "backward_data", "backward_weight")
Chunk = int | None


@dataclass(frozen=True)
class IntAccumulator:
    """An integer GEMM accumulator of ``bits`` bits (:func:`leantrain.numerics.int_matmul`).

    ``chunk=k`` splits the reduction dimension into blocks of ``k`` products; each block is summed in
    the ``bits``-bit accumulator, converted to FP32 and the blocks are summed in FP32 (the DFP16
    paper's remedy for INT32 overflow). ``chunk=None`` accumulates the whole reduction in the
    integer accumulator. A tuple ``(forward, backward_data, backward_weight)`` gives each GEMM its own
    chunk length (their reductions differ: input channels x taps, output channels x taps, batch x
    positions). ``overflow`` is what the accumulator does when a sum leaves its range:
    ``"wrap"`` (two's complement, what integer hardware does), ``"saturate"`` or ``"error"``.

    The default, chunks of 2, is overflow-free by bound for DFP16 operands (``|m| <= 2^15 - 1``): two
    products sum to at most ``2 (2^15 - 1)^2 = 2^31 - 2^17 + 2 <= 2^31 - 1``, while three can reach
    ``3.2e9`` (:func:`leantrain.numerics.safe_chunk`). Longer chunks are faster to emulate only on paper
    and wrap on real data (``dfp16-vision`` counts them).
    """

    bits: int = 32
    chunk: Chunk | tuple[Chunk, Chunk, Chunk] = 2
    overflow: Literal["wrap", "saturate", "error"] = "wrap"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 8 <= self.bits <= 64:
            raise ValueError(f"bits must be an int in [8, 64], got {self.bits!r}")
        chunks = self.chunk if isinstance(self.chunk, tuple) else (self.chunk,)
        if isinstance(self.chunk, tuple) and len(self.chunk) != 3:
            raise ValueError(f"chunk must be None, an int >= 1 or a tuple of 3 of them, got {self.chunk!r}")
        for c in chunks:
            if c is not None and (not isinstance(c, int) or isinstance(c, bool) or c < 1):
                raise ValueError(f"chunk must be None, an int >= 1 or a tuple of 3 of them, got {self.chunk!r}")
        if self.overflow not in ("wrap", "saturate", "error"):
            raise ValueError(f"overflow must be 'wrap', 'saturate' or 'error', got {self.overflow!r}")

    def chunk_for(self, gemm: str) -> Chunk:
        """The chunk length of GEMM ``gemm`` (``"forward"``, ``"backward_data"`` or ``"backward_weight"``)."""
        if isinstance(self.chunk, tuple):
            return self.chunk[GEMM_NAMES.index(gemm)]
        return self.chunk

    @property
    def label(self) -> str:
        def one(c: Chunk) -> str:
            return f"chunks of {c} -> FP32" if c else "unchunked"

        if isinstance(self.chunk, tuple):
            text = "; ".join(f"{g}: {one(c)}" for g, c in zip(GEMM_NAMES, self.chunk))
        else:
            text = one(self.chunk)
        return f"INT{self.bits} ({text}), {self.overflow} on overflow"


@dataclass(frozen=True)
class DynamicLossScaling:
    """Dynamic loss scaling (:class:`leantrain.precision.LossScaler`): start at ``init_scale``;
    on a step with an inf/NaN gradient skip the update and multiply the scale by ``backoff_factor``;
    after ``growth_interval`` consecutive finite steps multiply it by ``growth_factor``.
    The defaults are those of ``torch.amp.GradScaler``."""

    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000

    def __post_init__(self) -> None:
        if not self.init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {self.init_scale}")
        if not self.growth_factor > 1:
            raise ValueError(f"growth_factor must be > 1, got {self.growth_factor}")
        if not 0 < self.backoff_factor < 1:
            raise ValueError(f"backoff_factor must be in (0, 1), got {self.backoff_factor}")
        if not isinstance(self.growth_interval, int) or self.growth_interval < 1:
            raise ValueError(f"growth_interval must be an int >= 1, got {self.growth_interval!r}")


@dataclass(frozen=True)
class Policy:
    """What a mixed-precision training step rounds, GEMM by GEMM (see the module docstring).

    - ``forward = Gemm(a=X, b=W)``, ``backward_data = Gemm(a=dY, b=W)``,
      ``backward_weight = Gemm(a=X, b=dY)``;
    - ``accumulator``: ``"fp32"`` for float GEMMs; an :class:`IntAccumulator` for DFP GEMMs;
    - ``loss_scaling``: a :class:`DynamicLossScaling` (FP16) or ``None``;
    - ``embeddings``: round ``nn.Embedding`` lookups (table rows with ``forward.b``, the gradient
      rows with ``backward_weight.b``), accumulating the table gradient in FP32;
    - ``master_weights`` / ``optimizer_state``: ``None`` keeps them FP32 (both papers); a
      :class:`FloatSpec` rounds them after every optimizer step (an ablation);
    - ``fp32_ops``: the operations that stay FP32 (documentation, shown by :meth:`describe`);
    - ``activation``: the three GEMMs of a product of two *activations* (attention's ``Q K^T`` and ``P V``, any
      ``matmul``/``bmm``/``einsum`` where neither operand is a parameter), ``(forward, backward_data,
      backward_weight)`` with the first operand in the role of X and the second in that of W; ``None``: the same
      formats as the parameter GEMMs above (:meth:`for_kind`).

    A tensor that two GEMMs consume with the *same* spec is rounded once and shared (as a stored
    low-precision copy would be): W between forward and backward-data, X between forward and
    backward-weight, dY between the two backward GEMMs.
    """

    name: str
    forward: Gemm = field(default_factory=Gemm)
    backward_data: Gemm = field(default_factory=Gemm)
    backward_weight: Gemm = field(default_factory=Gemm)
    accumulator: Literal["fp32"] | IntAccumulator = "fp32"
    loss_scaling: DynamicLossScaling | None = None
    embeddings: bool = True
    master_weights: FloatSpec | None = None
    optimizer_state: FloatSpec | None = None
    fp32_ops: tuple[str, ...] = FP32_OPS
    activation: tuple[Gemm, Gemm, Gemm] | None = None

    def __post_init__(self) -> None:
        if self.activation is not None:
            if not (isinstance(self.activation, tuple) and len(self.activation) == 3
                    and all(isinstance(g, Gemm) for g in self.activation)):
                raise TypeError("activation must be None or a tuple of 3 Gemm (forward, backward_data, "
                                f"backward_weight), got {self.activation!r}")
            self.for_kind("activation")  # validates the activation GEMMs by the same rules
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        for what in ("forward", "backward_data", "backward_weight"):
            if not isinstance(getattr(self, what), Gemm):
                raise TypeError(f"{what} must be a Gemm, got {type(getattr(self, what)).__name__}")
        integer = [g.integer for g in self.gemms().values()]
        if any(integer) and not isinstance(self.accumulator, IntAccumulator):
            raise ValueError("a policy with DFP GEMM inputs needs accumulator=IntAccumulator(...), got "
                             f"{self.accumulator!r}")
        if not isinstance(self.accumulator, IntAccumulator) and self.accumulator != "fp32":
            raise ValueError(f"accumulator must be 'fp32' or an IntAccumulator, got {self.accumulator!r}")
        if any(integer) and not all(integer):
            raise ValueError("DFP inputs must be used in all three GEMMs or in none (integer and float GEMMs "
                             f"cannot be mixed in one layer), got {self.describe_inputs()}")
        if any(integer) and (self.backward_data.b != self.forward.b or self.backward_weight.a != self.forward.a):
            raise ValueError("with DFP GEMMs the backward GEMMs reuse the forward DFP copies of X and W: "
                             "backward_data.b must equal forward.b and backward_weight.a must equal forward.a")
        if isinstance(self.accumulator, IntAccumulator) and not any(integer):
            raise ValueError("accumulator=IntAccumulator needs DFP inputs in the GEMMs")
        if self.loss_scaling is not None and not isinstance(self.loss_scaling, DynamicLossScaling):
            raise TypeError(f"loss_scaling must be a DynamicLossScaling or None, got {type(self.loss_scaling).__name__}")
        for what in ("master_weights", "optimizer_state"):
            spec = getattr(self, what)
            if spec is not None and not isinstance(spec, FloatSpec):
                raise TypeError(f"{what} must be a FloatSpec or None, got {type(spec).__name__}")

    def describe_inputs(self) -> str:
        """One line naming every GEMM input's format."""
        return "; ".join(f"{k}=({_label(g.a)}, {_label(g.b)})" for k, g in self.gemms().items())

    def gemms(self) -> dict[str, Gemm]:
        """The three GEMMs by name."""
        return {"forward": self.forward, "backward_data": self.backward_data, "backward_weight": self.backward_weight}

    @property
    def rounds(self) -> bool:
        """True when any GEMM input is rounded (False: the model runs its plain FP32 code)."""
        return any(g.rounds for g in self.gemms().values()) or any(g.rounds for g in self.activation or ())

    def for_kind(self, kind: str) -> Policy:
        """The policy of one kind of GEMM, as the GEMM functions read it (``forward``, ``backward_data``,
        ``backward_weight``): ``"parameter"`` (one operand is a parameter: linear, convolution, embedding, a
        matmul with a weight) is this policy; ``"activation"`` (both operands are activations) has the
        ``activation`` GEMMs in their place (this policy when ``activation`` is None)."""
        if kind not in ("parameter", "activation"):
            raise ValueError(f"kind must be 'parameter' or 'activation', got {kind!r}")
        if kind == "parameter" or self.activation is None:
            return self
        f, d, w = self.activation
        acc = self.accumulator if f.integer else "fp32"
        return dataclasses.replace(self, forward=f, backward_data=d, backward_weight=w, accumulator=acc,
                                   activation=None)

    def replace(self, **changes: object) -> Policy:
        """A copy with some fields changed (``dataclasses.replace``), e.g. another chunk length."""
        return dataclasses.replace(self, **changes)

    def _operand_max(self) -> int:
        """The largest DFP mantissa magnitude of the GEMM inputs, ``2^(bits-1) - 1`` (0 without DFP inputs)."""
        return max((2 ** (s.bits - 1) - 1 for g in self.gemms().values() for s in (g.a, g.b)
                    if isinstance(s, DFPSpec)), default=0)

    def wrap_free(self, gemm: str) -> bool:
        """Whether no INT register of GEMM ``gemm`` can wrap, by bound: a chunk of ``c`` products of mantissas
        ``|m| <= M = 2^(bits-1) - 1`` sums to at most ``c M^2``, which fits when ``c <= safe_chunk(M, M, acc_bits)``
        (INT16 operands in INT32: ``c <= 2``). False for float GEMMs, unchunked registers and longer chunks."""
        acc = self.accumulator
        if not isinstance(acc, IntAccumulator):
            return False
        c, top = acc.chunk_for(gemm), self._operand_max()
        return c is not None and c <= safe_chunk(top, top, acc.bits)

    def _wrap_bound(self) -> str:
        """Per GEMM, whether its chunk registers can wrap (:meth:`wrap_free`), with the numbers."""
        acc = self.accumulator
        assert isinstance(acc, IntAccumulator)
        top, hi = self._operand_max(), 2 ** (acc.bits - 1) - 1
        parts = []
        for g in GEMM_NAMES:
            c = acc.chunk_for(g)
            if self.wrap_free(g):
                parts.append(f"{g}: overflow-free by bound ({c} x {top}^2 = {c * top * top} <= {hi})")  # type: ignore[operator]
            else:
                parts.append(f"{g}: can wrap ({'unchunked' if c is None else f'{c} x {top}^2 > {hi}'}; "
                             "the Recorder counts wrapped registers)")
        return "; ".join(parts)

    def describe(self) -> str:
        """A Markdown table of the data flow: every GEMM input's format, the accumulator, what stays FP32."""
        acc = "FP32" if self.accumulator == "fp32" else self.accumulator.label
        rows = [
            "| GEMM | input A | input B | accumulation / output |",
            "|---|---|---|---|",
            f"| forward Y = X W | X: {_label(self.forward.a)} | W: {_label(self.forward.b)} | {acc} -> FP32 |",
            f"| backward-data dX = dY W^T | dY: {_label(self.backward_data.a)} | W: {_label(self.backward_data.b)} "
            f"| {acc} -> FP32 |",
            f"| backward-weight dW = X^T dY | X: {_label(self.backward_weight.a)} | dY: {_label(self.backward_weight.b)} "
            f"| {acc} -> FP32 |",
        ]
        act = "same formats as the parameter GEMMs above"
        if self.activation is not None:
            act = self.for_kind("activation").describe_inputs()
        extra = [
            f"- activation x activation GEMMs (attention Q K^T and P V, matmul/bmm/einsum of two activations; "
            f"first operand as X, second as W): {act}",
            f"- master weights: {_label(self.master_weights)}; optimizer state: {_label(self.optimizer_state)}",
            f"- loss scaling: {'dynamic ' + str(dataclasses.asdict(self.loss_scaling)) if self.loss_scaling else 'none'}",
            f"- embeddings rounded: {'yes' if self.embeddings else 'no (FP32)'}",
            "- FP32: " + "; ".join(self.fp32_ops),
        ]
        if isinstance(self.accumulator, IntAccumulator):
            extra.insert(0, "- INT registers: " + self._wrap_bound())
        return f"**policy `{self.name}`**\n\n" + "\n".join(rows) + "\n\n" + "\n".join(extra)


def _float_policy(name: str, fwd: FloatSpec, bwd: FloatSpec, **kw: object) -> Policy:
    return Policy(name, forward=Gemm(fwd, fwd), backward_data=Gemm(bwd, fwd), backward_weight=Gemm(fwd, bwd), **kw)


def _named() -> dict[str, Policy]:
    bf = FloatSpec(BF16, "nearest")
    bf_sr = FloatSpec(BF16, "stochastic")
    bf_tr = FloatSpec(BF16, "truncate")
    fp16 = FloatSpec(FP16, "nearest")
    e4m3 = FloatSpec(FP8_E4M3, "nearest", scaling="tensor")
    e5m2 = FloatSpec(FP8_E5M2, "nearest", scaling="tensor")
    dfp = DFPSpec(16, "nearest")
    dfp_sr = DFPSpec(16, "stochastic")
    return {
        "fp32": Policy("fp32"),
        "bf16": _float_policy("bf16", bf, bf),
        "bf16-sr": _float_policy("bf16-sr", bf_sr, bf_sr),
        "bf16-trunc": _float_policy("bf16-trunc", bf_tr, bf_tr),
        "fp16": _float_policy("fp16", fp16, fp16),
        "fp16-scaled": _float_policy("fp16-scaled", fp16, fp16, loss_scaling=DynamicLossScaling()),
        # FP8: E4M3 for the forward operands (X, W, also reused by the backward GEMMs), E5M2 for the
        # output gradients; every operand scaled per tensor so its amax sits at the format's max.
        "fp8": _float_policy("fp8", e4m3, e5m2),
        # DFP16: activations and weights rounded to nearest; output gradients stochastically, which
        # keeps small gradients unbiased under the shared exponent (the paper's choice was not
        # recovered, see docs/precision.md). INT32 accumulation in chunks of 2 products in every GEMM: the
        # longest chunk that cannot wrap for any DFP16 operands (2 (2^15 - 1)^2 = 2^31 - 2^17 + 2 <= 2^31 - 1,
        # three products can reach 3.2e9). Longer chunks wrap on real data (dfp16-vision measures it); the
        # paper's block length was not recovered.
        "dfp16": Policy("dfp16", forward=Gemm(dfp, dfp), backward_data=Gemm(dfp_sr, dfp),
                        backward_weight=Gemm(dfp, dfp_sr), accumulator=IntAccumulator(32, 2, "wrap")),
    }


POLICIES: dict[str, Policy] = _named()


def policy_names() -> list[str]:
    """Names of the built-in policies."""
    return list(POLICIES)


def get_policy(policy: str | Policy) -> Policy:
    """The named policy (or ``policy`` itself when it is already a :class:`Policy`)."""
    if isinstance(policy, Policy):
        return policy
    if not isinstance(policy, str):
        raise TypeError(f"policy must be a Policy or one of {policy_names()}, got {type(policy).__name__}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {policy_names()}, got {policy!r}")
    return POLICIES[policy]
