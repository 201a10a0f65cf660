"""KV-shared ONNX ``Attention`` layers -> one ``com.microsoft.GroupQueryAttention`` each.

Dimension letters: B batch, S query length, T total length, N query heads, Nkv KV heads,
D head size. A KV-shared layer computes only its query ``query_BSD`` ([B, S, N*D], already
rotated) and attends over the cache of an earlier *source* layer, ``key_BNSH``/``value_BNSH``
([B, Nkv, T, D]), which the export turns 3-D with Transpose+Reshape (a copy per step).

The replacement reads the borrowed cache directly as GQA's past_key/past_value with an empty
[B, 0, Nkv*D] key/value ("past" form; SPEC.md section 3), so the transposes, reshapes and the
mask chain all die. GQA's built-in causality, ``local_window_size = W`` and
``seqlens_k = sum(attention_mask) - 1`` express exactly what the P1/P2 masks express for
right-padded batches; ``--exact-padding`` instead passes the mask as ``attention_bias``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from rewriter.rules._borrowed_cache import BorrowedCache, match_borrowed_cache
from rewriter.rules._mask_patterns import MaskForm, match_mask

__all__ = [
    "GQA_DTYPES",
    "FormChooser",
    "FormDecision",
    "KVSharedAttentionToGQA",
    "LayerRewrite",
    "LayerSkip",
    "always_past",
    "node_label",
]

# GroupQueryAttention kernels exist for these (CPU: fp32/fp16; CUDA: fp16/bf16). Which of
# them a provider runs is the probe's business; anything else is never rewritten.
GQA_DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})

# Fully masked rows must stay finite: -inf biases turn into NaN in fp16 GQA (SPEC.md 4).
_EXACT_PADDING_NEGATIVE = {
    ir.DataType.FLOAT: float(np.finfo(np.float32).min),
    ir.DataType.FLOAT16: float(np.finfo(np.float16).min),
    ir.DataType.BFLOAT16: -3.3895313892515355e38,
}


@dataclasses.dataclass(frozen=True)
class FormDecision:
    form: str | None  # "past" or "past-present"; None = leave the layer alone
    reason: str = ""


# (dtype name, head size D, windowed) -> which GQA form to emit.
FormChooser = Callable[[str, int, bool], FormDecision]


def always_past(dtype: str, head_size: int, windowed: bool) -> FormDecision:
    """Default chooser: the copy-free `past` form, as measured on ORT 1.31.1 CPU."""
    return FormDecision("past")


@dataclasses.dataclass(frozen=True)
class LayerRewrite:
    node: str
    rule: str
    form: str
    local_window_size: int | None
    mask_style: str
    source: str  # the borrowed cache value, e.g. present.3.key
    dtype: str
    head_size: int


@dataclasses.dataclass(frozen=True)
class LayerSkip:
    node: str
    reason: str


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What check() established, for rewrite() to build."""

    key: BorrowedCache
    value: BorrowedCache
    mask: MaskForm
    num_heads: int
    kv_num_heads: int
    head_size: int
    scale: float
    softcap: float
    dtype: ir.DataType
    form: str
    graph: ir.Graph | ir.Function


def node_label(node: ir.Node) -> str:
    return node.name or f"{node.op_type}({node.outputs[0].name})"


class KVSharedAttentionToGQA(pattern.RewriteRuleClassBase):
    """Every ai.onnx Attention node reaches check(); it decides and says why not."""

    def __init__(
        self, choose_form: FormChooser = always_past, *, exact_padding: bool = False
    ) -> None:
        super().__init__("KVSharedAttentionToGQA", remove_nodes=False)
        self.choose_form = choose_form
        self.exact_padding = exact_padding
        self.rewrites: list[LayerRewrite] = []
        self.skips: dict[str, LayerSkip] = {}
        self.replaced_nodes: list[ir.Node] = []
        # (GQA output, the Attention output name it takes over once the Attention is gone)
        self.renames: list[tuple[ir.Value, str]] = []
        self._plan: _Plan | None = None
        self._current_graph: ir.Graph | ir.Function | None = None
        # Values computed once per graph (seqlens_k, total length, empty K/V), keyed by the
        # graph they live in: onnxscript visits subgraphs in the middle of their parent.
        self._graph_values: dict[tuple[object, ...], ir.Value] = {}
        self._model_lengths: dict[tuple[object, ...], tuple[ir.Value, ir.Value] | None] = {}
        self._created: set[ir.Node] = set()

    def pattern(self, op, query_BSD, key_BSD, value_BSD, mask):
        return op.Attention(
            query_BSD, key_BSD, value_BSD, mask, _allow_other_inputs=True, _outputs=["output"]
        )

    def check(self, context, query_BSD, key_BSD, value_BSD, mask, output, **_):
        attention = context.root
        verdict = self._plan_for(context, attention, query_BSD, key_BSD, value_BSD, mask)
        label = node_label(attention)
        if isinstance(verdict, str):
            self.skips[label] = LayerSkip(label, verdict)
            return pattern.MatchResult().fail(verdict, attention)
        self.skips.pop(label, None)
        self._plan = verdict
        return True

    def _plan_for(self, context, attention, query, key, value, mask) -> _Plan | str:
        opset = context.model.opset_imports.get("", 0)
        if opset not in (23, 24):
            return f"ai.onnx opset {opset}: the rules know Attention of opsets 23 and 24"
        if any(v is not None for v in attention.inputs[4:]):
            return "has past_key/past_value/nonpad_kv_seqlen inputs: not a KV-shared layer"
        if any(out.uses() or out.is_graph_output() for out in attention.outputs[1:]):
            return "present or qk_matmul outputs are used"
        if mask is None:
            return "has no mask input"
        attrs = attention.attributes
        num_heads = attrs.get_int("q_num_heads", 0)
        kv_num_heads = attrs.get_int("kv_num_heads", 0)
        if num_heads <= 0 or kv_num_heads <= 0:
            return "q_num_heads/kv_num_heads missing (needed for 3-D inputs)"
        if num_heads % kv_num_heads:
            return f"q_num_heads {num_heads} is not a multiple of kv_num_heads {kv_num_heads}"
        borrowed_key = match_borrowed_cache(context, key)
        if isinstance(borrowed_key, str):
            return borrowed_key
        borrowed_value = match_borrowed_cache(context, value)
        if isinstance(borrowed_value, str):
            return borrowed_value
        if not _same_source(borrowed_key.cache_BNSH, borrowed_value.cache_BNSH):
            return "K and V do not come from the same source layer's present outputs"
        head_size = _head_size(borrowed_key, borrowed_value, query, num_heads, kv_num_heads)
        if isinstance(head_size, str):
            return head_size
        mask_form = match_mask(context, mask)
        if isinstance(mask_form, str):
            return mask_form
        is_causal = attrs.get_int("is_causal", 0)
        if not is_causal and not mask_form.causal_in_mask:
            return "neither is_causal nor the mask makes attention causal; GQA is always causal"
        dtype = query.dtype or borrowed_key.cache_BNSH.dtype
        if dtype not in GQA_DTYPES:
            return f"dtype {dtype} has no GroupQueryAttention kernel"
        if borrowed_key.cache_BNSH.dtype not in (None, dtype):
            return "query and borrowed cache dtypes differ"
        softcap = attrs.get_float("softcap", 0.0)
        scale_attr = attrs.get("scale")
        scale = scale_attr.as_float() if scale_attr is not None else 1.0 / math.sqrt(head_size)
        decision = self.choose_form(
            _dtype_name(dtype), head_size, mask_form.local_window_size is not None
        )
        if decision.form is None:
            return f"no GroupQueryAttention form qualifies: {decision.reason}"
        return _Plan(
            borrowed_key,
            borrowed_value,
            mask_form,
            num_heads,
            kv_num_heads,
            head_size,
            scale,
            softcap,
            dtype,
            decision.form,
            context.graph_or_function,
        )

    def rewrite(self, op, query_BSD, key_BSD, value_BSD, output, **_):
        plan = self._plan
        assert plan is not None, "rewrite() without a successful check()"
        self._plan = None
        attention = output.producer()
        self._current_graph = plan.graph
        self.replaced_nodes.append(attention)
        attention_mask = plan.mask.attention_mask
        seqlens_k, total_length = self._sequence_lengths(op, attention_mask)
        attributes: dict[str, object] = {
            "num_heads": plan.num_heads,
            "kv_num_heads": plan.kv_num_heads,
            "scale": plan.scale,
            "do_rotary": 0,
        }
        if plan.softcap:
            attributes["softcap"] = plan.softcap
        if plan.mask.local_window_size is not None and not self.exact_padding:
            attributes["local_window_size"] = plan.mask.local_window_size
        key_value_past = self._key_value_past(op, plan, query_BSD, key_BSD, value_BSD)
        inputs: list[ir.Value | None] = [query_BSD, *key_value_past, seqlens_k, total_length]
        if self.exact_padding:
            # cos_cache, sin_cache, position_ids unused; attention_bias is input 10.
            inputs += [None, None, None, self._finite_bias(op, plan)]
        # Only `past` and `split-nopresent` omit the (unused) present outputs: ORT 1.31.1
        # needs them for the others (SPEC.md section 3; the probe decides what qualifies).
        num_outputs = 1 if plan.form in ("past", "split-nopresent") else 3
        results = op.GroupQueryAttention(
            *inputs, _domain="com.microsoft", _outputs=num_outputs, **attributes
        )
        first_result = results[0] if num_outputs > 1 else results
        self._created.add(first_result.producer())
        if output.name:
            self.renames.append((first_result, output.name))
        self.rewrites.append(
            LayerRewrite(
                node=node_label(attention),
                rule=f"{self.name}/{plan.mask.style}-{_layer_kind(plan.mask)}",
                form=plan.form,
                local_window_size=plan.mask.local_window_size,
                mask_style=plan.mask.style,
                source=plan.key.cache_BNSH.name or "",
                dtype=_dtype_name(plan.dtype),
                head_size=plan.head_size,
            )
        )
        return first_result

    def _key_value_past(
        self, op, plan: _Plan, query_BSD: ir.Value, key_BSD: ir.Value, value_BSD: ir.Value
    ) -> list[ir.Value | None]:
        """GQA's key, value, past_key, past_value for the chosen form (SPEC.md section 3)."""
        key_BNSH, value_BNSH = plan.key.cache_BNSH, plan.value.cache_BNSH
        if plan.form in ("past", "past-present"):
            hidden = plan.kv_num_heads * plan.head_size
            empty = self._empty_kv(op, plan.mask.attention_mask, hidden, plan.dtype)
            return [empty, empty, key_BNSH, value_BNSH]
        if plan.form == "kv":
            # The export's own 3-D K/V (Transpose+Reshape kept), no past.
            return [key_BSD, value_BSD, None, None]
        if plan.form in ("split", "split-nopresent"):
            # past = cache[:, :, :T-S]; this call's keys = cache[:, :, T-S:] made 3-D.
            query_length = op.Shape(query_BSD, start=1, end=2)
            cache_length = op.Shape(key_BNSH, start=2, end=3)
            past_length = op.Sub(cache_length, query_length)
            time_axis = op.Constant(value_ints=[2])
            start = op.Constant(value_ints=[0])
            merged = op.Constant(value_ints=[0, 0, plan.kv_num_heads * plan.head_size])
            result: list[ir.Value | None] = []
            pasts: list[ir.Value | None] = []
            for cache in (key_BNSH, value_BNSH):
                pasts.append(op.Slice(cache, start, past_length, time_axis))
                new = op.Slice(cache, past_length, cache_length, time_axis)
                result.append(op.Reshape(op.Transpose(new, perm=[0, 2, 1, 3]), merged))
            return result + pasts
        raise ValueError(f"unknown GroupQueryAttention form {plan.form!r}")

    # --- values shared by every rewritten layer of a graph --------------------------------

    def _cached(self, key: tuple[object, ...], build: Callable[[], ir.Value]) -> ir.Value:
        assert self._current_graph is not None
        key = (id(self._current_graph), *key)
        if key not in self._graph_values:
            self._graph_values[key] = build()
        return self._graph_values[key]

    def _sequence_lengths(self, op, attention_mask: ir.Value) -> tuple[ir.Value, ir.Value]:
        def total_length() -> ir.Value:
            return op.Cast(op.Shape(attention_mask, start=1, end=2), to=ir.DataType.INT32)

        def seqlens_k() -> ir.Value:
            if self.exact_padding:
                # Every key slot is "valid" to GQA; the bias does all of the masking.
                batch = op.Shape(attention_mask, start=0, end=1)
                one = op.Constant(value=ir.tensor(np.array([1], dtype=np.int32)))
                return op.Expand(op.Sub(total(), one), batch)
            mask = attention_mask
            if mask.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
                mask = op.Cast(mask, to=ir.DataType.INT64)
            valid = op.ReduceSum(mask, op.Constant(value_ints=[1]), keepdims=0)
            return op.Cast(
                op.Sub(valid, op.CastLike(op.Constant(value_int=1), valid)), to=ir.DataType.INT32
            )

        def total() -> ir.Value:
            return self._cached(("total", attention_mask), total_length)

        if not self.exact_padding:
            existing = self._model_sequence_lengths()
            if existing is not None:
                return existing
        return self._cached(("seqlens_k", attention_mask, self.exact_padding), seqlens_k), total()

    def _model_sequence_lengths(self) -> tuple[ir.Value, ir.Value] | None:
        """The seqlens_k/total_sequence_length the model's own GQA layers already use.

        Reused only when every pre-existing GQA node of this graph agrees on one pair, so the
        rewritten layers follow exactly the padding convention the model already has.
        """
        graph = self._current_graph
        assert graph is not None
        key = (id(graph), "model_lengths")
        if key not in self._model_lengths:
            pairs = {
                (node.inputs[5], node.inputs[6])
                for node in graph
                if node.op_type == "GroupQueryAttention"
                and node.domain == "com.microsoft"
                and node not in self._created
                and len(node.inputs) > 6
            }
            pair = pairs.pop() if len(pairs) == 1 else None
            self._model_lengths[key] = pair if pair and None not in pair else None
        return self._model_lengths[key]

    def _empty_kv(self, op, attention_mask: ir.Value, hidden: int, dtype: ir.DataType) -> ir.Value:
        # Empty key/value must carry the real batch size: ORT checks it against the query.
        def build() -> ir.Value:
            batch = op.Shape(attention_mask, start=0, end=1)
            shape = op.Concat(batch, op.Constant(value_ints=[0, hidden]), axis=0)
            return op.ConstantOfShape(shape, value=ir.tensor(np.zeros(1, dtype=dtype.numpy())))

        return self._cached(("empty_kv", attention_mask, hidden, dtype), build)

    def _finite_bias(self, op, plan: _Plan) -> ir.Value:
        def build() -> ir.Value:
            allowed = plan.mask.boolean_mask
            if not plan.mask.boolean_mask_has_head_axis:
                # GQA's attention_bias is 4-D [B or 1, N or 1, S, T].
                allowed = op.Unsqueeze(allowed, op.Constant(value_ints=[1]))
            zero = op.Constant(value=ir.tensor(np.zeros((), dtype=plan.dtype.numpy())))
            negative = op.Constant(
                value=ir.tensor(
                    np.array(_EXACT_PADDING_NEGATIVE[plan.dtype], dtype=plan.dtype.numpy())
                )
            )
            return op.Where(allowed, zero, negative)

        return self._cached(("bias", plan.mask.boolean_mask, plan.dtype), build)


def _dtype_name(dtype: ir.DataType) -> str:
    """NumPy spelling (float32, float16, bfloat16), as the probe and the report use."""
    return np.dtype(dtype.numpy()).name


def _layer_kind(mask: MaskForm) -> str:
    return "full" if mask.local_window_size is None else "sliding"


def _same_source(key_BNSH: ir.Value, value_BNSH: ir.Value) -> bool:
    key_producer, value_producer = key_BNSH.producer(), value_BNSH.producer()
    if key_producer is not None or value_producer is not None:
        return (
            key_producer is value_producer
            and key_BNSH.index() is not None
            and key_BNSH.index() != value_BNSH.index()
        )
    # Caches that are graph inputs: pair them by name (past_key_values.3.key / .value).
    key_name, value_name = key_BNSH.name or "", value_BNSH.name or ""
    return key_name != value_name and key_name.replace("key", "value") == value_name


def _head_size(
    key: BorrowedCache, value: BorrowedCache, query: ir.Value, num_heads: int, kv_num_heads: int
) -> int | str:
    candidates: set[int] = set()
    for cache in (key, value):
        shape = cache.cache_BNSH.shape
        if shape is not None:
            if shape.rank() != 4:
                return f"borrowed cache {cache.cache_BNSH.name} is not 4-D BNSH"
            if isinstance(shape[1], int) and shape[1] != kv_num_heads:
                return (
                    f"borrowed cache has {shape[1]} heads, "
                    f"Attention says kv_num_heads={kv_num_heads}"
                )
            if isinstance(shape[3], int):
                candidates.add(shape[3])
        if cache.hidden_size is not None:
            if cache.hidden_size % kv_num_heads:
                return "Reshape size is not a multiple of kv_num_heads"
            candidates.add(cache.hidden_size // kv_num_heads)
    if query.shape is not None and query.shape.rank() == 3 and isinstance(query.shape[2], int):
        candidates.add(query.shape[2] // num_heads)
    if not candidates:
        return "head size unknown (no static shape on the query or the borrowed cache)"
    if len(candidates) > 1:
        return f"inconsistent head sizes {sorted(candidates)} between query and borrowed cache"
    return candidates.pop()
