"""What a speed choice can give a KV-shared layer besides GroupQueryAttention, per phase.

Measured on onnxruntime 1.32.0 CPU (E2B attention size, ``bench/attention_forms.py``): GQA is
not the fastest kernel everywhere. A full-attention layer at D=512 decodes at T=4096 in
14.1 ms through GQA, 7.1 ms as exported and 5.9 ms as ``Attention`` reading the borrowed
BNSH cache in place, while its prefill at S=2048 is 468 ms through GQA against 674 ms as
exported. So a layer may run one form in decode (S == 1) and another in prefill, behind one
``If`` on the query length.

Forms of a phase:

* ``gqa``: what the rule writes anyway (SPEC.md section 3, with the window slice);
* ``attention-bnsh``: the export's ``Attention`` and mask on 4-D inputs: the query reshaped
  to [B, N, S, D], the borrowed cache read as it is (no Transpose+Reshape copy of T keys);
* ``export``: the export's own ``Attention`` node, unchanged;
* ``fold`` (decode only): the query heads that share a KV head folded into the query-length
  axis, Q [B, 1, N*D] read as [B, Nkv, N/Nkv, D], one product per KV head over the borrowed
  BNSH cache in place (``fold_product``: FusedMatMul/Softmax/MatMul in float32, which ORT
  spreads over its intra-op threads; ``Attention`` on 4-D inputs otherwise). A layer with
  its own cache folds over ``Concat(past, new)``, which is also its present output
  (``own_cache_fold``). In decode every query head of a row sees the same keys, so this is
  one product per KV head instead of N/Nkv: ONNX Runtime's CPU kernels (GQA and Attention
  alike) loop over query heads and stream the cache once per head. A KV-shared layer's mask
  is built from GQA's lengths (``GraphInputs.fold_bias``), so it computes what GQA computes
  and may replace a defective export too; over a cache written as the export writes it, a
  correct export's own bias (rules.kv_shared_attention).

A layer with its own cache gets ``If(S == 1: fold, else: gqa)`` (or ``else: export``;
``own_cache_fold``): its decode appends the new key/value after the past (``Concat``, the
present outputs) and folds over the result with the export's own bias, so it keeps the
export's convention exactly (a right-padded row's new key after its padding); its prefill is
GQA's native form (a prompt's presents are the same) or the export's own node.

Only a correct export (a P2 bias with ``is_causal=0``) may keep its Attention in any phase.
The fold is causal only because its query is one token: it never runs a prefill. A
speculative-decoding drafter's layers fold at any S (``fold_unmasked``): its full layer has
no mask and ``is_causal=0`` (every query sees every key of the target's cache), its sliding
layers an ``is_causal=0`` bias shared by all heads, which the fold repeats over the folded
heads (rules.kv_shared_attention.UnmaskedSharedAttentionToFold, DrafterBiasAttentionToFold).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter._context import TapeBuilder

from rewriter.rules._naming import name_after

__all__ = [
    "DEFECTIVE_EXPORT_REASON",
    "EXPORT_FREE_FORMS",
    "PHASE_FORMS",
    "SPEED_FORM_KEY",
    "SPEED_LAYER_KEY",
    "SpeedChoice",
    "attention_bnsh",
    "export_attention",
    "fold",
    "fold_unmasked",
    "own_cache_fold",
    "phase_if",
]

MS_DOMAIN = "com.microsoft"

PHASE_FORMS = ("gqa", "attention-bnsh", "export", "fold")
# Forms that read nothing of the export's Attention or mask: a defective export may get them.
EXPORT_FREE_FORMS = frozenset({"gqa", "fold"})

# Why a speed choice never keeps an is_causal=1 KV-shared export (SPEC.md section 2, P1 (a)).
DEFECTIVE_EXPORT_REASON = (
    "not timed: the export's is_causal=1 without past inputs is aligned to the upper left, "
    "wrong in decode; GroupQueryAttention is the correctness fix"
)

# Node metadata on the Attention nodes a speed choice writes: a later run leaves them alone
# instead of "rewriting" what was chosen over GQA (rules._attention_rule.check_not_chosen).
# (The model-level keys' prefix, rewriter.metadata.METADATA_PREFIX; the rules import nothing
# of the rewriter.)
SPEED_FORM_KEY = "kvshare_gqa_rewriter.speed_form"
# On the node whose output replaces a layer's Attention output, when that is not a GQA node.
SPEED_LAYER_KEY = "kvshare_gqa_rewriter.speed_layer"


@dataclasses.dataclass(frozen=True)
class SpeedChoice:
    decode: str = "gqa"
    prefill: str = "gqa"
    reason: str = ""

    def __post_init__(self) -> None:
        for phase in (self.decode, self.prefill):
            if phase not in PHASE_FORMS:
                raise ValueError(f"a phase form is one of {PHASE_FORMS}, got {phase!r}")
        if self.prefill == "fold":
            raise ValueError("the fold is a decode form (one query token per row)")
        if self.decode == "fold" and self.prefill not in ("gqa", "export"):
            # A KV-shared layer's fold reads the lengths and window slice built for GQA's
            # prefill; an own-cache layer's reads the export's bias (own_cache_fold).
            raise ValueError(
                "the fold decodes behind GQA's or the export's prefill, not " + self.prefill
            )

    @property
    def export_free(self) -> bool:
        """Whether no phase reads the export's Attention or its mask."""
        return {self.decode, self.prefill} <= EXPORT_FREE_FORMS

    @property
    def label(self) -> str:
        """ "gqa", "attention-bnsh", "export", or "if(S==1: decode form, else: prefill form)"."""
        if self.decode == self.prefill:
            return self.decode
        return f"if(S==1: {self.decode}, else: {self.prefill})"


# A phase's output [B, S, N*D] (and, for a layer with its own cache, its two presents), built
# with the builder it is given (main graph or a branch).
PhaseBuilder = Callable[[object], ir.Value | tuple[ir.Value, ...]]


def attention_bnsh(
    op,
    attention: ir.Node,
    query_BSD: ir.Value,
    caches_BNSH: tuple[ir.Value, ir.Value],
    num_heads: int,
    head_size: int,
    scale: float,
) -> ir.Value:
    """The export's Attention (same mask, scale and softcap) on the BNSH cache in place."""
    query_BNSD = op.Transpose(
        op.Reshape(query_BSD, op.Constant(value_ints=[0, 0, num_heads, head_size])),
        perm=[0, 2, 1, 3],
    )
    attributes: dict[str, object] = {"scale": scale, "is_causal": 0}
    softcap = attention.attributes.get_float("softcap", 0.0)
    if softcap:
        attributes["softcap"] = softcap
    # 4-D inputs carry their head counts; q_num_heads/kv_num_heads are for 3-D ones.
    output_BNSD = op.Attention(query_BNSD, *caches_BNSH, attention.inputs[3], **attributes)
    output_BNSD.producer().metadata_props[SPEED_FORM_KEY] = "attention-bnsh"
    output_BSND = op.Transpose(output_BNSD, perm=[0, 2, 1, 3])
    return op.Reshape(output_BSND, op.Constant(value_ints=[0, 0, num_heads * head_size]))


def fold_product(
    op,
    query_BKQD: ir.Value,
    caches_BNSH: tuple[ir.Value, ir.Value],
    bias_BKQT: ir.Value | None,
    *,
    scale: float,
    softcap: float,
    dtype: ir.DataType,
    bias_is_bool: bool = False,
    bias_rows: int = 1,
) -> ir.Value:
    """``softmax(softcap(scale * Q K^T) + bias) V`` with no causal mask, Q [B, Nkv, Q, D]
    against the cache [B, Nkv, T, D] as it is: the fold's one product per KV head.

    float32 gets ``FusedMatMul`` (K^T and the scale inside the GEMM; no copy of the cache),
    ``Softmax`` and ``MatMul``: ONNX Runtime's CPU ``Attention`` runs each (batch, head) on
    one thread with a single-threaded GEMM, so a fold with Nkv = 1 used one core, while MatMul
    spreads over every intra-op thread. Same kernels (MLAS SGEMM and softmax): bit-identical
    outputs on onnxruntime 1.32.0, and on 2 threads a full E2B layer (D=512, T=4096) takes
    0.57 of Attention's time, the real E2B export's decode step at T=4096 113 ms against 124
    (bench/results/results_1.32_fold_product.json, results_1.32_e2b_default_c1f2f76.json).
    ``FusedMatMul`` is written out rather than left to ORT's
    Transpose+MatMul fusion, which a session below ORT_ENABLE_EXTENDED does not run (the
    Transpose would then copy the cache). Other dtypes keep ``Attention`` (4-D inputs: q heads
    = kv heads = Nkv, sequence = Q), whose fp16 CPU kernel upcasts per GEMM.

    `bias_is_bool`: the bias is a boolean mask (True: attend), as ``Attention`` takes it; the
    float32 form turns it into ``Where(mask, 0, lowest)``, the float ORT's CPU ``Attention``
    fills masked scores with. `bias_rows`: the bias [B, 1, 1, T] holds one row for this many
    query rows (the fold's G heads of one token); ``Add`` broadcasts it, ``Attention`` needs
    it expanded (ONNX Runtime broadcasts the mask's head axis, not its query axis: measured
    on 1.32.0, "inconsistent q_sequence_length")."""
    key_BNTD, value_BNTD = caches_BNSH
    if dtype != ir.DataType.FLOAT:
        attributes: dict[str, object] = {"scale": scale, "is_causal": 0}
        if softcap:
            attributes["softcap"] = softcap
        bias = [] if bias_BKQT is None else [bias_BKQT]
        if bias and bias_rows > 1:
            bias = [op.Expand(bias_BKQT, op.Constant(value_ints=[1, 1, bias_rows, 1]))]
        output = op.Attention(query_BKQD, key_BNTD, value_BNTD, *bias, **attributes)
        output.producer().metadata_props[SPEED_FORM_KEY] = "fold"
        return output
    scores = op.FusedMatMul(query_BKQD, key_BNTD, transB=1, alpha=scale, _domain=MS_DOMAIN)
    steps = [scores]
    if softcap:
        # As ONNX Attention orders it: softcap, then the mask/bias (onnx/onnx#7867).
        cap = op.Constant(value=ir.tensor(np.array(softcap, dtype=np.float32)))
        steps.append(op.Div(steps[-1], cap))
        steps.append(op.Tanh(steps[-1]))
        steps.append(op.Mul(steps[-1], cap))
    if bias_BKQT is not None:
        if bias_is_bool:
            zero = op.Constant(value=ir.tensor(np.array(0.0, dtype=np.float32)))
            lowest = op.Constant(value=ir.tensor(np.array(np.finfo(np.float32).min)))
            bias_BKQT = op.Where(bias_BKQT, zero, lowest)
            bias_BKQT.producer().metadata_props[SPEED_FORM_KEY] = "fold"
        steps.append(op.Add(steps[-1], bias_BKQT))
    steps.append(op.Softmax(steps[-1], axis=-1))
    steps.append(op.MatMul(steps[-1], value_BNTD))
    for step in steps:  # what a profile or a test reads as the fold's own work
        step.producer().metadata_props[SPEED_FORM_KEY] = "fold"
    return steps[-1]


def fold(
    op,
    query_BSD: ir.Value,
    caches_BNSH: tuple[ir.Value, ir.Value],
    bias_B11T: ir.Value,
    *,
    num_heads: int,
    kv_num_heads: int,
    head_size: int,
    scale: float,
    softcap: float,
    dtype: ir.DataType,
) -> ir.Value:
    """One decode step (S == 1) with the G = N/Nkv query heads of each KV head as the query
    axis: Q [B, 1, N*D] -> [B, Nkv, G, D] (query head h reads KV head h // G, as in GQA),
    the product over the cache [B, Nkv, T, D] as it is (``fold_product``), with `bias_B11T`
    [B, 1, 1, T] (``GraphInputs.fold_bias``) for every folded head, and the output
    [B, Nkv, G, D] -> [B, 1, N*D].
    Both reshapes are free; no transpose is needed because S is 1."""
    group = num_heads // kv_num_heads
    query_BKGD = op.Reshape(query_BSD, op.Constant(value_ints=[0, kv_num_heads, group, head_size]))
    output_BKGD = fold_product(
        op,
        query_BKGD,
        caches_BNSH,
        bias_B11T,
        scale=scale,
        softcap=softcap,
        dtype=dtype,
        bias_rows=group,
    )
    return op.Reshape(output_BKGD, op.Constant(value_ints=[0, 1, num_heads * head_size]))


def fold_unmasked(
    op,
    query_BSD: ir.Value,
    caches_BNSH: tuple[ir.Value, ir.Value],
    *,
    num_heads: int,
    kv_num_heads: int,
    head_size: int,
    scale: float,
    softcap: float,
    dtype: ir.DataType,
    bias_B1ST: ir.Value | None = None,
    bias_is_bool: bool = False,
) -> ir.Value:
    """The fold at any S, for a layer whose queries do not need their own head's mask: Q
    [B, S, N*D] -> [B, S, Nkv, G, D] -> [B, Nkv, S, G, D] -> [B, Nkv, S*G, D] (query head h
    reads KV head h // G, as in GQA and the export), the product with no causal mask over the
    cache [B, Nkv, T, D] as it is (``fold_product``), and the output back the same way.

    Without `bias_B1ST` (a layer without mask and with is_causal=0, a drafter's full layer
    over the target's cache) every query sees every key. With it (the export's own additive
    bias [B or 1, 1, S, T], one for all heads: a drafter's sliding layer), query (s, g) gets
    row s of the bias, repeated over the G heads: [B, 1, S, G, T] -> [B, 1, S*G, T]. Either
    way it computes what the export's Attention (is_causal=0) computes, for every S and B."""
    group = num_heads // kv_num_heads
    query_BSKGD = op.Reshape(
        query_BSD, op.Constant(value_ints=[0, 0, kv_num_heads, group, head_size])
    )
    query_BKSGD = op.Transpose(query_BSKGD, perm=[0, 2, 1, 3, 4])
    query_BKQD = op.Reshape(query_BKSGD, op.Constant(value_ints=[0, 0, -1, head_size]))
    bias_B1QT = None
    if bias_B1ST is not None:
        bias_B1S1T = op.Unsqueeze(bias_B1ST, op.Constant(value_ints=[3]))
        # Expanded to the query's S too: a bias broadcast over the queries stays exact.
        expanded = op.Expand(
            bias_B1S1T,
            op.Concat(
                op.Constant(value_ints=[1, 1]),
                op.Shape(query_BSD, start=1, end=2),
                op.Constant(value_ints=[group, 1]),
                axis=0,
            ),
        )
        folded_shape = op.Concat(
            op.Shape(expanded, start=0, end=2),
            op.Constant(value_ints=[-1]),
            op.Shape(expanded, start=4, end=5),
            axis=0,
        )
        bias_B1QT = op.Reshape(expanded, folded_shape)
    output_BKQD = fold_product(
        op,
        query_BKQD,
        caches_BNSH,
        bias_B1QT,
        scale=scale,
        softcap=softcap,
        dtype=dtype,
        bias_is_bool=bias_is_bool,
    )
    output_BKSGD = op.Reshape(output_BKQD, op.Constant(value_ints=[0, 0, -1, group, head_size]))
    output_BSKGD = op.Transpose(output_BKSGD, perm=[0, 2, 1, 3, 4])
    return op.Reshape(output_BSKGD, op.Constant(value_ints=[0, 0, num_heads * head_size]))


def own_cache_fold(
    op,
    attention: ir.Node,
    *,
    num_heads: int,
    kv_num_heads: int,
    head_size: int,
    scale: float,
    softcap: float,
    dtype: ir.DataType,
    window_start: ir.Value | None = None,
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """One decode step (S == 1) of a layer with its own cache, as the export computes it:
    the new key/value [B, 1, Nkv*D] read as [B, Nkv, 1, D] (free: S is 1) and appended to the
    past [B, Nkv, P, D] (``Concat``: the present outputs, as the export's Attention writes
    them), then the fold over the presents with the export's own bias [B, 1, 1, T] for the G
    folded query heads. Returns (output, present_key, present_value).

    `window_start` ([1], a sliding layer: GQAInputs.appended_window_start): the fold reads the
    presents and the bias from that key slot on, the only keys the window lets any row see
    (ONNX Runtime's Attention reads every key it is given, masked or not)."""
    query_BSD, key_BSD, value_BSD, bias_B11T = attention.inputs[:4]
    past_key_BNPD, past_value_BNPD = attention.inputs[4:6]
    assert None not in (query_BSD, key_BSD, value_BSD, bias_B11T, past_key_BNPD, past_value_BNPD)
    new_shape = op.Constant(value_ints=[0, kv_num_heads, 1, head_size])
    presents = tuple(
        op.Concat(past, op.Reshape(new, new_shape), axis=2)
        for past, new in ((past_key_BNPD, key_BSD), (past_value_BNPD, value_BSD))
    )
    read, bias = presents, bias_B11T
    if window_start is not None:
        end = op.Constant(value_ints=[np.iinfo(np.int64).max])  # Slice clamps it to T
        read = tuple(op.Slice(p, window_start, end, op.Constant(value_ints=[2])) for p in presents)
        bias = op.Slice(bias_B11T, window_start, end, op.Constant(value_ints=[3]))
    output = fold(
        op,
        query_BSD,
        read,
        bias,
        num_heads=num_heads,
        kv_num_heads=kv_num_heads,
        head_size=head_size,
        scale=scale,
        softcap=softcap,
        dtype=dtype,
    )
    return output, *presents


def export_attention(
    op, attention: ir.Node, num_outputs: int = 1
) -> ir.Value | tuple[ir.Value, ...]:
    """A copy of the export's Attention node, reading the same values (its first
    `num_outputs` outputs: 3 for a layer whose presents it writes)."""
    attributes = {
        name: ir.Attr(name, attr.type, attr.value) for name, attr in attention.attributes.items()
    }
    outputs = op.Attention(*attention.inputs, _outputs=num_outputs, **attributes)
    first = outputs if num_outputs == 1 else outputs[0]
    first.producer().metadata_props[SPEED_FORM_KEY] = "export"
    return outputs


def phase_if(
    op,
    query_BSD: ir.Value,
    *,
    decode: PhaseBuilder,
    prefill: PhaseBuilder,
    output_type: ir.TypeProtocol | tuple[ir.TypeProtocol | None, ...] | None,
    name: str,
) -> ir.Value | tuple[ir.Value, ...]:
    """``If(S == 1)``: the decode form for one-token steps, the prefill form otherwise.

    The branches read what they need from the enclosing graph; their values are named after
    `name` (the replaced output), since names must be unique across the enclosing scopes.
    Builders that return several values (output and presents) give an If with as many
    outputs, typed by the tuple `output_type`.
    """
    many = isinstance(output_type, tuple)
    types = output_type if isinstance(output_type, tuple) else (output_type,)
    branches: dict[str, ir.Graph] = {}
    for phase, build in (("decode", decode), ("prefill", prefill)):
        tape = TapeBuilder()
        built = build(tape)
        outputs = built if isinstance(built, tuple) else (built,)
        for output, known in zip(outputs, types, strict=True):
            if known is not None and output.type is None:
                output.type = known
        name_after(tape.nodes, f"{name}/{phase}")
        branches[phase] = ir.Graph((), outputs, nodes=tape.nodes, name=f"{name}/{phase}")
    query_length = op.Shape(query_BSD, start=1, end=2)
    is_decode = op.Equal(query_length, op.Constant(value_ints=[1]))
    results = op.If(
        is_decode,
        then_branch=branches["decode"],
        else_branch=branches["prefill"],
        _outputs=len(types),
    )
    results = tuple(results) if many else (results,)
    for result, known in zip(results, types, strict=True):
        if known is not None:
            result.type = known
    return results if many else results[0]
