"""Properties 1 and 5: random Gemma-4-like decoders rewrite, verify and stay equivalent.

Each example draws a whole decoder (layout, sources, heads, head sizes up to 512, window,
scale, softcap, dtype, mask style, Reshape style), rewrites it with the default pipeline
(the probe picks the form) and asks the verifier. The verifier picks its own lengths, so
the drawn (B, S, past) shapes are also run directly on ONNX Runtime: original against
rewritten where the original is a valid reference, and the rewritten model's decode
against its own full prefill always.

Numerics. Tolerances are the verifier's, fixed per dtype and never widened. A random-weight
decoder can be ill-conditioned, though: RMS-normed q and k with scale 1 give attention
logits of size ~sqrt(D), so softmax is nearly one-hot and a rounding-level change in one
layer can move the next by much more; in fp16 this compounds over layers to the size of
the tolerance itself. A failed comparison is therefore checked against the model's own
rounding sensitivity, measured on a *rounding twin* that computes the same function with
other rounding (fp32: weights moved by one ulp; fp16: the exact float32 upcast), and for an
export that is right by construction (P2, is_causal=0) also by the original's own misses of
the verifier's oracles, which can then only be rounding. Only when
that sensitivity reaches half the tolerance, and the miss is within ten times it, is the
comparison inconclusive (a hypothesis event, counted in ``--hypothesis-show-statistics``);
otherwise the failure stands: a wrong rewrite misses by O(1) on any model.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from decoder_runs import TOLERANCE, Decoder, relative_error
from hypothesis import event, given, note
from hypothesis import strategies as st
from strategies import RunShapes, decoder_configs, run_shapes

import rewriter
from rewriter.fixtures.gemma4_like import DecoderConfig, build_decoder
from rewriter.verification import CheckResult, VerificationResult

pytestmark = pytest.mark.property

# ORT 1.31.1 CPU GroupQueryAttention (SPEC.md section 4): a call with S > 1 after a past
# must have B = 1. An original whose own layers are GQA has the same limit.
_CHUNK_NEEDS_BATCH_1 = "batch_size must be 1 when sequence_length > 1 and past context is given"
_LAYER = re.compile(r"/model/layers\.(\d+)/")
_INCONCLUSIVE = "inconclusive: the model's own rounding reaches the tolerance"


def rounding_explains(error: float, noise: float) -> bool:
    """Whether a miss (both in tolerances) is what rounding does to this model: its rounding
    twin moves by half the tolerance or more, and the miss is of that order, not far beyond
    (a wrong rewrite misses by O(1), whatever the model's conditioning)."""
    return noise > 0.5 and error <= 10 * noise


def attention_labels(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "Attention" and n.domain == ""]


def layer_of(label: str) -> int:
    match = _LAYER.match(label)
    assert match, label
    return int(match[1])


def assert_report_is_consistent(labels: list[str], report) -> None:
    """Property 5: each candidate is either rewritten or skipped, exactly once."""
    rewritten = [r.node for r in report.rewrites]
    skipped = [s.node for s in report.skipped]
    assert len(set(rewritten)) == len(rewritten), rewritten
    assert len(set(skipped)) == len(skipped), skipped
    assert not set(rewritten) & set(skipped)
    assert sorted(rewritten + skipped) == sorted(labels)
    assert all(s.reason for s in report.skipped)


def assert_only_gqa_limits_are_refused(config: DecoderConfig, report) -> None:
    """Every layer of these decoders is rewritable, except where GQA cannot run its D; a
    rewritten layer carries its own head size and, when sliding, the model's window."""
    types = config.resolved_layer_types
    for skip in report.skipped:
        head_size = config.head_dim(types[layer_of(skip.node)])
        assert head_size % 8 != 0, (skip.node, skip.reason)
        assert "head_size must be a multiple of 8" in skip.reason, skip.reason
    for done in report.rewrites:
        layer_type = types[layer_of(done.node)]
        assert done.head_size == config.head_dim(layer_type)
        window = config.sliding_window if layer_type == "sliding" else None
        assert done.local_window_size == window


@given(config=decoder_configs())
def test_report_accounts_for_every_attention_layer(config: DecoderConfig) -> None:
    original = build_decoder(config)
    _, report = rewriter.rewrite(original)
    note(report.summary())
    assert_report_is_consistent(attention_labels(original), report)
    assert_only_gqa_limits_are_refused(config, report)


@dataclasses.dataclass(frozen=True)
class Kept:
    """What the rewritten model keeps of the original's defects, by the layers left alone."""

    three_d_mask: bool  # a P1 Attention is left: its [B, S, T] mask breaks B > 1
    upper_left: bool  # a shared layer with is_causal=1 is left: wrong in decode

    @classmethod
    def of(cls, config: DecoderConfig, report) -> Kept:
        kept = {layer_of(s.node) for s in report.skipped}
        return cls(
            three_d_mask=bool(kept) and config.mask_style == "p1",
            upper_left=bool(kept & set(config.shared_layers))
            and not (config.mask_style == "p2" and config.p2_is_causal == 0),
        )

    @property
    def defects(self) -> bool:
        return self.three_d_mask or self.upper_left


@given(data=st.data(), config=decoder_configs())
def test_random_decoders_rewrite_and_verify(data: st.DataObject, config: DecoderConfig) -> None:
    original = build_decoder(config)
    rewritten, report = rewriter.rewrite(original)
    note(report.summary())
    assert_report_is_consistent(attention_labels(original), report)
    assert_only_gqa_limits_are_refused(config, report)
    kept = Kept.of(config, report)
    sound = config.mask_style == "p2" and config.p2_is_causal == 0

    if config.dtype == "float16":
        # The rewritten graph, dtype aside, holds at float32 tolerance; the fp16 models at
        # fp16 tolerance. The drawn shapes then run on the float32 twins.
        original32, rewritten32 = float32_twin(original), float32_twin(rewritten)
        assert_verifies(original32, rewritten32, kept, sound)
        assert_verifies(original, rewritten, kept, sound)
        original, rewritten = original32, rewritten32
    else:
        assert_verifies(original, rewritten, kept, sound)

    shapes = data.draw(run_shapes(config.sliding_window), label="shapes")
    compare_directly(config, Runner(original), Runner(rewritten), report, shapes, kept)


# --- the verifier's verdict ----------------------------------------------------------------


def assert_verifies(
    original: onnx.ModelProto, rewritten: onnx.ModelProto, kept: Kept, sound: bool
) -> None:
    """The verifier passes (or, with kept layers, fails only as the original does), unless
    the miss is rounding: see the module docstring. ``sound``: the original export has no
    defect by construction (P2, is_causal=0), so any check it fails shows its rounding."""
    result = rewriter.verify(original, rewritten)
    note(result.summary())
    offending = offending_checks(result, kept)
    if not offending:
        return
    noise = max(rounding_noise(original), rounding_noise(rewritten))
    if sound:
        original_misses = [c for k in result.checks if k.model == "original" for c in k.cases]
        noise = max([noise, *(c.severity for c in original_misses if not c.passed)])
    # A check that raised has no cases: never a rounding matter.
    worst = max(max((c.severity for c in k.cases), default=math.inf) for k in offending)
    note(f"rounding sensitivity {noise:.2f}, worst offending case {worst:.2f} (tolerances)")
    assert rounding_explains(worst, noise), result.summary()
    event(_INCONCLUSIVE)


def offending_checks(result: VerificationResult, kept: Kept) -> list[CheckResult]:
    """The candidate checks that break the verdict."""
    failed = [k for k in result.checks if k.model == "candidate" and k.passed is False]
    if not kept.defects:
        if result.passed:
            return []
        return failed or [CheckResult.error("verdict", "candidate", "no passing prefill")]
    # A layer GQA cannot run stays as it was, defect included: the candidate may then fail
    # exactly the checks the original fails, and no other; prefill equivalence always holds.
    original_failed = {k.name for k in result.checks if k.model == "original" and k.passed is False}
    return [k for k in failed if k.name not in original_failed or k.name == "prefill_equivalence"]


def rounding_noise(model: onnx.ModelProto) -> float:
    """How far the model's rounding twin lands on the verifier's own scenarios, in units of
    the model's tolerance (the worst case of its prefill and decode comparisons)."""
    result = rewriter.verify(model, rounding_twin(model))
    comparisons = ("prefill_equivalence", "decode_equivalence")
    severities = [c.severity for k in result.checks if k.name in comparisons for c in k.cases]
    return max(severities, default=0.0)


def rounding_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same function with other rounding: fp16 upcast to float32, fp32 one ulp off."""
    fp16 = onnx.TensorProto.FLOAT16
    if any(t.data_type == fp16 for t in model.graph.initializer):
        return float32_twin(model)
    return ulp_twin(model)


def ulp_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every float weight (not the scalar constants) moved by one ulp, up or down."""
    twin = ir.from_proto(model)
    rng = np.random.default_rng(0)
    for value in twin.graph.initializers.values():
        tensor = value.const_value
        if value.dtype == ir.DataType.FLOAT and tensor is not None and tensor.size > 1:
            weights = tensor.numpy()
            direction = rng.choice(np.array([-np.inf, np.inf], np.float32), size=weights.shape)
            moved = np.nextafter(weights, direction)  # float32 both: a float32 ulp
            value.const_value = ir.tensor(moved, name=value.name)
    return ir.to_proto(twin)


def float32_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph computing in float32: every fp16 tensor, type and attribute upcast
    exactly, so it is the fp16 model's function without its rounding."""
    twin = ir.from_proto(model)
    fp16, fp32 = ir.DataType.FLOAT16, ir.DataType.FLOAT

    def upcast(tensor: ir.TensorProtocol) -> ir.Tensor:
        return ir.tensor(tensor.numpy().astype(np.float32), name=tensor.name)

    for value in twin.graph.initializers.values():
        if value.dtype == fp16:
            value.const_value = upcast(value.const_value)
    nodes = list(ir.traversal.RecursiveGraphIterator(twin.graph))
    for node in nodes:
        for name, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.TENSOR and attr.as_tensor().dtype == fp16:
                node.attributes[name] = ir.AttrTensor(name, upcast(attr.as_tensor()))
            elif name == "to" and attr.type == ir.AttributeType.INT and attr.as_int() == fp16:
                node.attributes[name] = ir.AttrInt64(name, int(fp32))
    values = [*twin.graph.inputs, *twin.graph.outputs, *twin.graph.initializers.values()]
    values += [value for node in nodes for value in node.outputs]
    for value in values:
        if value.dtype == fp16:
            value.type = ir.TensorType(fp32)
    return ir.to_proto(twin)


# --- direct runs at drawn shapes ---------------------------------------------------------


class Runner:
    """A model on ONNX Runtime, and its rounding twin when a comparison needs one."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.decoder = Decoder(model)
        self.has_gqa = any(n.op_type == "GroupQueryAttention" for n in model.graph.node)
        self._twin: Decoder | None = None

    @property
    def twin(self) -> Decoder:
        if self._twin is None:
            self._twin = Decoder(rounding_twin(self.model))
        return self._twin

    def sensitivity(self, scenario: Callable[[Decoder], np.ndarray]) -> Callable[[], float]:
        return lambda: relative_error(scenario(self.twin), scenario(self.decoder))


def assert_close(
    label: str,
    actual: np.ndarray,
    expected: np.ndarray,
    tolerance: float,
    *sensitivities: Callable[[], float],
) -> None:
    error = relative_error(actual, expected)
    if error <= tolerance:
        return
    noise = max(sensitivity() for sensitivity in sensitivities)
    message = f"{label}: {error:.3g} > {tolerance:.3g} (rounding sensitivity {noise:.3g})"
    note(message)
    assert rounding_explains(error / tolerance, noise / tolerance), message
    event(_INCONCLUSIVE)


def compare_directly(
    config: DecoderConfig,
    original: Runner,
    rewritten: Runner,
    report,
    shapes: RunShapes,
    kept: Kept,
) -> None:
    tolerance = TOLERANCE[np.dtype(rewritten.decoder.dtype)]
    rng = np.random.default_rng(config.seed)

    # Right-padded prefill: every row's valid positions equal that row run alone.
    padded = max(shapes.row_lengths)
    ids = rng.integers(0, config.vocab_size, (shapes.batch, padded), dtype=np.int64)
    mask = np.zeros((shapes.batch, padded), dtype=np.int64)
    for row, length in enumerate(shapes.row_lengths):
        mask[row, :length] = 1

    def prefill(decoder: Decoder) -> np.ndarray:
        return decoder.run(ids, mask)["logits"]

    if shapes.batch == 1 or not kept.three_d_mask:
        batch = prefill(rewritten.decoder)
        for row, length in enumerate(shapes.row_lengths):
            alone = rewritten.decoder.run(ids[row : row + 1, :length], mask[row : row + 1, :length])
            assert_close(
                f"padded prefill row {row}",
                batch[row, :length],
                alone["logits"][0],
                tolerance,
                rewritten.sensitivity(prefill),
            )
        # The original is a reference for prefill wherever its mask is well-formed: P2 at
        # any batch, P1 only at B = 1 (its 3-D mask is read as [heads, S, T]).
        if config.mask_style == "p2" or shapes.batch == 1:
            reference = prefill(original.decoder)
            for row, length in enumerate(shapes.row_lengths):
                assert_close(
                    f"prefill vs original, row {row}",
                    batch[row, :length],
                    reference[row, :length],
                    tolerance,
                    rewritten.sensitivity(prefill),
                    original.sensitivity(prefill),
                )

    # Decode: `past` tokens, then one call of `step` tokens.
    total = shapes.past + shapes.step
    ids = rng.integers(0, config.vocab_size, (shapes.batch, total), dtype=np.int64)
    if shapes.batch > 1 and shapes.step > 1 and rewritten.has_gqa and not original.has_gqa:
        # The rewrite brought GQA into an all-Attention model, and with it GQA's limits: the
        # contract it declares.
        assert report.padding_contract == "right-padding-only"
    if shapes.batch > 1 and kept.three_d_mask:
        return

    def stepped(runner: Runner) -> Callable[[Decoder], np.ndarray]:
        return lambda decoder: decode(decoder, ids, shapes.past, runner.has_gqa)

    def full(decoder: Decoder) -> np.ndarray:
        return decoder.run(ids, np.ones((shapes.batch, total), np.int64))["logits"][
            :, shapes.past :
        ]

    decoded = stepped(rewritten)(rewritten.decoder)
    if not kept.upper_left:
        assert_close(
            "decode vs full prefill",
            decoded,
            full(rewritten.decoder),
            tolerance,
            rewritten.sensitivity(stepped(rewritten)),
            rewritten.sensitivity(full),
        )
    if config.mask_style == "p2" and config.p2_is_causal == 0:
        # Only this export is right in decode (P1 and P2 with is_causal=1 are upper-left
        # aligned); the verifier reports those as defects of the original.
        assert_close(
            "decode vs original",
            decoded,
            stepped(original)(original.decoder),
            tolerance,
            rewritten.sensitivity(stepped(rewritten)),
            original.sensitivity(stepped(original)),
        )


def decode(model: Decoder, ids: np.ndarray, past: int, has_gqa: bool) -> np.ndarray:
    """Logits of positions past.. of a prefill of `past` tokens then one call for the rest.

    A batched call of S > 1 after a past is outside what GQA runs: a model with a GQA layer
    refuses it with ORT's message, and the rows are then run one by one.
    """
    batch, total = ids.shape
    if batch > 1 and total - past > 1 and has_gqa:
        with pytest.raises(Exception, match=_CHUNK_NEEDS_BATCH_1):
            _decode_call(model, ids, past)
        return np.concatenate([_decode_call(model, ids[b : b + 1], past) for b in range(batch)])
    return _decode_call(model, ids, past)


def _decode_call(model: Decoder, ids: np.ndarray, past: int) -> np.ndarray:
    batch, total = ids.shape
    first = model.run(ids[:, :past], np.ones((batch, past), np.int64))
    return model.run(ids[:, past:], np.ones((batch, total), np.int64), first)["logits"]
