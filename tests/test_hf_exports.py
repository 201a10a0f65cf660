"""Hugging Face exports (transformers exporter, torch.onnx dynamo): every layer becomes GQA,
and ONNX Runtime computes the same thing before and after.

The corpus export is read from ``../shared/corpus/`` (never copied into the repository); the
torch.onnx fixture is committed, made by ``fixtures/hf_export.py``.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import rewriter
from rewriter.fixtures.hf_export import TORCH_DECODE, TORCH_PREFILL, TRANSFORMERS_PAIR
from rewriter.report import PaddingContract, RewriteReport
from rewriter.rules import always_past
from rewriter.verification import verify_pair
from rewriter.verification._tolerance import compare

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus" / "hf-exporter-opset23"
FIXTURES = ROOT / "fixtures"

# What the rewrite must leave no trace of: the repeat, the position mask, the row zeroing.
GONE = ("Attention", "Range", "LessOrEqual", "Greater", "Not", "Where", "Expand", "GatherND")


def _rewrite(path: Path, layers: str = "all") -> tuple[ir.Model, RewriteReport]:
    return rewriter.rewrite(ir.load(path), layers=layers, choose_form=always_past)


def _save(model: ir.Model, path: Path) -> str:
    ir.save(model, path, external_data=path.name + ".data")
    return str(path)


def _ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph)


@pytest.mark.corpus
@pytest.mark.parametrize("graph", ["prefill", "decode"])
def test_corpus_every_layer_becomes_gqa(graph):
    model, report = _rewrite(CORPUS / f"{graph}.onnx")
    assert report.rewritten == 8, report.summary()
    assert not report.skipped
    rules = sorted(r.rule.split("/")[-1] for r in report.rewrites)
    assert rules.count("shared-sliding") == 2 and rules.count("shared-full") == 2, rules
    assert {r.local_window_size for r in report.rewrites} == {8, None}
    # Source layers use GQA's native append (their presents replace the export's Concat),
    # shared layers the copy-free past form over those presents.
    forms = {r.rule.split("/")[-1].split("-")[0]: r.form for r in report.rewrites}
    assert forms == {"own": "native", "shared": "past"}
    assert report.padding_contract == PaddingContract.BATCH_1_ONLY
    assert any("batch-1-only" in w for w in report.warnings)
    ops = _ops(model)
    assert ops["GroupQueryAttention"] == 8
    assert not [op for op in GONE if ops[op]], ops


@pytest.mark.corpus
def test_corpus_layers_shared_leaves_the_source_layers():
    _, report = _rewrite(CORPUS / "decode.onnx", layers="shared")
    assert sorted(r.node[-1] for r in report.rewrites) == ["4", "5", "6", "7"]
    assert len(report.skipped) == 4
    assert all("--layers shared leaves it" in s.reason for s in report.skipped)


@pytest.mark.corpus
def test_corpus_pair_equals_the_original(tmp_path):
    """Prefill at S = 1, 3, 11, 18 (window 8), then decode fed the prefill's presents."""
    prefill, _ = _rewrite(CORPUS / "prefill.onnx")
    decode, _ = _rewrite(CORPUS / "decode.onnx")
    candidate = (_save(prefill, tmp_path / "p.onnx"), _save(decode, tmp_path / "d.onnx"))
    original = (str(CORPUS / "prefill.onnx"), str(CORPUS / "decode.onnx"))
    result = verify_pair(original, candidate)
    assert result.passed, result.summary()
    by_name = {(c.name, c.model): c for c in result.checks}
    assert by_name[("cache_consistency", "original")].passed  # so decode equivalence ran
    assert by_name[("decode_equivalence", "both")].passed is True
    assert by_name[("prefill_equivalence", "both")].cases


@pytest.mark.corpus
def test_corpus_pair_verifier_catches_a_wrong_window(tmp_path):
    """The check can fail: GQA's window one short of the export's differs beyond S = 8."""
    prefill, _ = _rewrite(CORPUS / "prefill.onnx")
    decode, _ = _rewrite(CORPUS / "decode.onnx")
    for model in (prefill, decode):
        for node in model.graph:
            if node.op_type == "GroupQueryAttention" and "local_window_size" in node.attributes:
                node.attributes["local_window_size"] = ir.AttrInt64("local_window_size", 7)
    candidate = (_save(prefill, tmp_path / "p.onnx"), _save(decode, tmp_path / "d.onnx"))
    result = verify_pair((str(CORPUS / "prefill.onnx"), str(CORPUS / "decode.onnx")), candidate)
    assert not result.passed
    prefill_check = next(c for c in result.checks if c.name == "prefill_equivalence")
    failed = {c.label.split()[0] for c in prefill_check.cases if not c.passed}
    assert "S=11" in failed and "S=1" not in failed


# --- near misses: refused, with the reason ------------------------------------------------


def _corpus_prefill() -> ir.Model:
    return ir.load(CORPUS / "prefill.onnx")


def _constant_input(model: ir.Model, op_type: str, index: int, value: int) -> ir.Value:
    """The constant input `index` of the first `op_type` node whose constant equals value."""
    for node in model.graph:
        candidate = node.inputs[index] if len(node.inputs) > index else None
        if (
            node.op_type == op_type
            and candidate is not None
            and candidate.const_value is not None
            and candidate.const_value.numpy().reshape(-1).tolist() == [value]
        ):
            return candidate
    raise AssertionError(f"no {op_type} with constant {value}")


def _skip_reasons(model: ir.Model) -> dict[str, str]:
    _, report = rewriter.rewrite(model, choose_form=always_past)
    return {s.node: s.reason for s in report.skipped}


@pytest.mark.corpus
def test_near_miss_changed_repeat_factor():
    model = _corpus_prefill()
    factor = _constant_input(model, "Concat", 2, 4)  # Expand shape [1, 1, g=4, T, 32]
    factor.const_value = ir.tensor(np.array([2], dtype=np.int64))
    reasons = _skip_reasons(model)
    assert reasons, "a repeat that does not give one K head per query head was rewritten"
    assert all("repeat factor 2 x 1 KV heads != 4 heads" in r for r in reasons.values()), reasons


@pytest.mark.corpus
def test_near_miss_window_not_a_constant():
    model = _corpus_prefill()
    window = _constant_input(model, "Sub", 1, 8)
    runtime_window = ir.Value(
        name="window", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.INT64)
    )
    model.graph.inputs.append(runtime_window)
    window.replace_all_uses_with(runtime_window)
    reasons = _skip_reasons(model)
    assert len(reasons) == 5, reasons  # the 5 sliding layers; the 3 full ones are rewritten
    assert set(reasons.values()) == {"window is not a constant"}


@pytest.mark.corpus
def test_near_miss_row_zeroing_with_another_threshold():
    """Where(Less(row sum, 2), 0, attention) zeroes rows that do see a key: not fusable."""
    model = _corpus_prefill()
    less = next(
        n for n in model.graph if n.op_type == "Less" and n.inputs[1].const_value is not None
    )
    less.replace_input_with(
        1, ir.Value(name="two", const_value=ir.tensor(np.array(2.0, np.float32)))
    )
    model.graph.initializers["two"] = less.inputs[1]
    reasons = _skip_reasons(model)
    assert reasons and set(reasons.values()) == {"output Where's condition is not Less(row sum, 1)"}


@pytest.mark.corpus
def test_near_miss_cache_concat_on_the_wrong_axis():
    model = ir.load(CORPUS / "decode.onnx")
    (concat,) = [n for n in model.graph if n.outputs[0].name == "output.cache.layers.0.keys"]
    concat.attributes["axis"] = ir.AttrInt64("axis", 1)
    reasons = _skip_reasons(model)
    assert reasons == {
        "node_scaled_dot_product_attention": "cache output.cache.layers.0.keys is "
        "Concat(past, new) on axis 1, not the sequence axis 2 of BNSH: not a KV-cache append"
    }


# --- torch.onnx dynamo, opset 24, attention_mask, dynamic batch -------------------------


@pytest.fixture(scope="module")
def torch_export(tmp_path_factory):
    model, report = _rewrite(FIXTURES / TORCH_PREFILL)
    path = tmp_path_factory.mktemp("hf") / "rewritten.onnx"
    ir.save(model, path)
    return model, report, str(path)


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def test_torch_export_every_layer_becomes_gqa(torch_export):
    model, report, _ = torch_export
    assert report.rewritten == 8, report.summary()
    assert not report.skipped
    assert sum(r.rule.endswith(("shared-sliding", "shared-full")) for r in report.rewrites) == 4
    assert report.padding_contract == PaddingContract.RIGHT_PADDING_ONLY
    ops = _ops(model)
    # This graph has no position_ids input: one Range stays, the rotary positions.
    assert ops["Range"] == 1
    assert not [op for op in GONE if ops[op] and op != "Range"], ops


def test_torch_export_layers_are_named_after_what_they_replace(torch_export):
    # A profile or runtime error must point at the layer; the inputs all layers share
    # (seqlens_k and the lengths) belong to none of them.
    model, report, _ = torch_export
    layers = [r.node for r in report.rewrites]
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == len(layers) == 8
    for node in gqa:
        (layer,) = [layer for layer in layers if node.name.startswith(f"{layer}/")]
        query = node.inputs[0].producer()
        assert query is not None and query.op_type == "Reshape"
        assert query.name.startswith(f"{layer}/")  # the layer's own merge of its heads
        seqlens_k = node.inputs[5].producer()
        assert seqlens_k is not None
        assert not any(seqlens_k.name.startswith(f"{other}/") for other in layers)


@pytest.mark.parametrize("length", [1, 3, 11, 18])
def test_torch_export_prefill_equals_the_original(torch_export, length):
    _, _, rewritten = torch_export
    rng = np.random.default_rng(length)
    feeds = {
        "input_ids": rng.integers(0, 128, (1, length), dtype=np.int64),
        "attention_mask": np.ones((1, length), dtype=np.int64),
    }
    original = _session(str(FIXTURES / TORCH_PREFILL)).run(None, feeds)
    candidate = _session(rewritten).run(None, feeds)
    for reference, actual in zip(original, candidate, strict=True):
        case = compare(f"S={length}", reference, actual)
        assert case.passed, case


def test_torch_export_right_padded_batch_2(torch_export):
    """Row 1 is 7 tokens right-padded to 12 (past the window 8): at the valid positions both
    models match each row run alone, and each other."""
    _, _, rewritten = torch_export
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 128, (2, 12), dtype=np.int64)
    mask = np.ones((2, 12), dtype=np.int64)
    mask[1, 7:] = 0
    for path in (str(FIXTURES / TORCH_PREFILL), rewritten):
        session = _session(path)
        batch = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
        for row, valid in ((0, 12), (1, 7)):
            alone = session.run(
                ["logits"],
                {
                    "input_ids": ids[row : row + 1, :valid],
                    "attention_mask": mask[row : row + 1, :valid],
                },
            )[0]
            case = compare(f"{path} row {row}", alone[0], batch[row, :valid])
            assert case.passed, case
    original = _session(str(FIXTURES / TORCH_PREFILL)).run(
        ["logits"], {"input_ids": ids, "attention_mask": mask}
    )[0]
    candidate = _session(rewritten).run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    for row, valid in ((0, 12), (1, 7)):
        case = compare(f"row {row}", original[row, :valid], candidate[row, :valid])
        assert case.passed, case


@pytest.fixture(scope="module")
def torch_decode(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_decode")
    decode, report = _rewrite(FIXTURES / TORCH_DECODE)
    prefill, _ = _rewrite(FIXTURES / TORCH_PREFILL)
    return report, _save(decode, directory / "decode.onnx"), _save(prefill, directory / "p.onnx")


def test_torch_decode_every_layer_becomes_gqa(torch_decode):
    """DynamicSlidingWindowLayer's trimmed sliding caches (Concat(Slice(past, -7), new),
    key positions Range(0, P + S) + Max(0, P - 7)) are proven and read as GQA pasts."""
    report, path, _ = torch_decode
    rewritten = {r.node[-1]: r.rule.split("/")[-1] for r in report.rewrites}
    assert rewritten == {
        "n": "own-cache-sliding",  # node_scaled_dot_product_attention
        "1": "own-cache-sliding",
        "2": "own-cache-full",
        "3": "own-cache-sliding",
        "4": "shared-sliding",
        "5": "shared-sliding",
        "6": "shared-full",
        "7": "shared-full",
    }, report.summary()
    assert not report.skipped
    assert {r.local_window_size for r in report.rewrites if "sliding" in r.rule} == {8}
    # Own caches, trimmed or not, are appended by GQA (the export's trimming Slice of the
    # present stays); shared layers read those presents as their past.
    forms = {r.rule.split("/")[-1].split("-")[0]: r.form for r in report.rewrites}
    assert forms == {"own": "native", "shared": "past"}
    ops = _ops(ir.load(path))
    assert ops["GroupQueryAttention"] == 8
    assert not [op for op in GONE if ops[op]], ops


def _decode_feeds(session, rng, batch: int, past: int, length: int) -> dict[str, np.ndarray]:
    feeds = {
        "input_ids": rng.integers(0, 128, (batch, length), dtype=np.int64),
        "attention_mask": np.ones((batch, past + length), dtype=np.int64),
        "position_ids": np.broadcast_to(np.arange(past, past + length), (batch, length)).copy(),
    }
    for graph_input in session.get_inputs()[3:]:
        shape = (batch, 1, past, graph_input.shape[3])
        feeds[graph_input.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


@pytest.mark.parametrize(
    ("batch", "past", "length"), [(1, 0, 1), (1, 1, 1), (2, 6, 1), (1, 5, 3), (2, 7, 1), (1, 7, 3)]
)
def test_torch_decode_equals_the_original(torch_decode, batch, past, length):
    """Every past of the same length P <= W - 1 = 7: the export's trimmed caches keep all
    of it, and every output (logits and the trimmed presents) equals the original's."""
    _, path, _ = torch_decode
    original, candidate = _session(str(FIXTURES / TORCH_DECODE)), _session(path)
    feeds = _decode_feeds(original, np.random.default_rng(past), batch, past, length)
    for output, reference, actual in zip(
        original.get_outputs(), original.run(None, feeds), candidate.run(None, feeds), strict=True
    ):
        case = compare(f"B={batch} P={past} S={length} {output.name}", reference, actual)
        assert case.passed, case


def test_torch_decode_layers_shared_equals_the_original(tmp_path):
    """--layers shared: the 4 KV-shared layers read the export's own trimmed Concat."""
    model, report = _rewrite(FIXTURES / TORCH_DECODE, layers="shared")
    assert sorted(r.node[-1] for r in report.rewrites) == ["4", "5", "6", "7"]
    assert {s.reason for s in report.skipped} == {
        "a layer with its own cache (source of its repeat_kv); --layers shared leaves it"
    }
    original, candidate = (
        _session(str(FIXTURES / TORCH_DECODE)),
        _session(_save(model, tmp_path / "shared.onnx")),
    )
    for batch, past, length in ((2, 6, 1), (1, 5, 3), (1, 7, 1)):
        feeds = _decode_feeds(original, np.random.default_rng(past), batch, past, length)
        for output, reference, actual in zip(
            original.get_outputs(),
            original.run(None, feeds),
            candidate.run(None, feeds),
            strict=True,
        ):
            case = compare(f"B={batch} P={past} S={length} {output.name}", reference, actual)
            assert case.passed, case


@pytest.mark.parametrize("past", [8, 12])
def test_torch_decode_original_fails_from_a_past_of_w(torch_decode, past):
    """A defect of the export, not hidden: traced at P = 6 < W, its sliding masks have
    P + S key columns and gather attention_mask at Max(0, P - 7) + j, out of bounds once
    P >= W = 8; the rewrite reads only the trimmed cache and runs."""
    _, path, _ = torch_decode
    original = _session(str(FIXTURES / TORCH_DECODE))
    feeds = _decode_feeds(original, np.random.default_rng(past), 1, past, 1)
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="GatherND"):
        original.run(None, feeds)
    (logits,) = _session(path).run(["logits"], feeds)
    assert np.all(np.isfinite(logits))


def _run_prefill(prefill, ids: np.ndarray) -> dict[str, np.ndarray]:
    names = [o.name for o in prefill.get_outputs()]
    outputs = prefill.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    return dict(zip(names, outputs, strict=True))


def _cache_consistency(prefill, decode, ids, length, chunks) -> list:
    """Prefill `length` tokens, feed its (trimmed) presents to decode calls of `chunks`
    tokens, against one prefill of the whole sequence."""
    full = _run_prefill(prefill, ids[:, : length + sum(chunks)])["logits"]
    past = _run_prefill(prefill, ids[:, :length])
    cases, position = [], length
    for chunk in chunks:
        feeds = {
            "input_ids": ids[:, position : position + chunk],
            "attention_mask": np.ones((1, position + chunk), dtype=np.int64),
            "position_ids": np.arange(position, position + chunk)[None],
        }
        for graph_input in decode.get_inputs()[3:]:
            feeds[graph_input.name] = past[graph_input.name.replace("past_key_values", "present")]
        outputs = decode.run(None, feeds)
        label = f"prompt {length}, tokens {position}..{position + chunk - 1}"
        cases.append(compare(label, full[:, position : position + chunk], outputs[0]))
        past = dict(zip([o.name for o in decode.get_outputs()], outputs, strict=True))
        position += chunk
    return cases


@pytest.mark.parametrize("length", [1, 3, 7, 8, 11, 17])
@pytest.mark.parametrize("chunks", [(1, 1, 1), (3,)])
def test_torch_decode_rewritten_pair_is_cache_consistent(torch_decode, length, chunks):
    """The rewritten prefill and decode graphs, fed each other's trimmed presents, equal one
    longer prefill, below, at and beyond the window (the original pair stops at a prompt of
    W - 1: its decode graph fails once the full layer's past outgrows the sliding ones')."""
    _, decode, prefill = torch_decode
    ids = np.random.default_rng(length).integers(0, 128, (1, length + 3), dtype=np.int64)
    for case in _cache_consistency(_session(prefill), _session(decode), ids, length, chunks):
        assert case.passed, case


def test_torch_decode_original_pair_is_cache_consistent_below_the_window():
    """Below the window the original pair is consistent (so the equivalence above is held
    against a valid reference); at a prompt of 6 and 3 steps, the third step's past is the
    full layer's 8 entries against the sliding layers' trimmed 7 and the original fails."""
    ids = np.random.default_rng(3).integers(0, 128, (1, 10), dtype=np.int64)
    prefill = _session(str(FIXTURES / TORCH_PREFILL))
    decode = _session(str(FIXTURES / TORCH_DECODE))
    for case in _cache_consistency(prefill, decode, ids, 5, (1,)):
        assert case.passed, case
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="Expand"):
        _cache_consistency(prefill, decode, ids, 6, (1, 1, 1))


def _padded_step(prefill, decode, ids, lengths, new_ids, convention: str) -> np.ndarray:
    """A right-padded prefill of 2 rows, then one decode token per row; `convention` says
    where the mask puts it: right after the row's tokens ("prefix", GQA's convention) or
    after the padding ("append", the export's Concat)."""
    padded = ids.shape[1]
    mask = np.zeros((len(lengths), padded), dtype=np.int64)
    step = np.zeros((len(lengths), padded + 1), dtype=np.int64)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        step[row, :n] = 1
        step[row, n if convention == "prefix" else padded] = 1
    names = [o.name for o in prefill.get_outputs()]
    presents = dict(
        zip(names, prefill.run(None, {"input_ids": ids, "attention_mask": mask}), strict=True)
    )
    feeds = {
        "input_ids": new_ids,
        "attention_mask": step,
        "position_ids": np.array([[n] for n in lengths], dtype=np.int64),
    }
    for graph_input in decode.get_inputs()[3:]:
        feeds[graph_input.name] = presents[graph_input.name.replace("past_key_values", "present")]
    return decode.run(["logits"], feeds)[0]


@pytest.mark.parametrize("lengths", [(6, 3), (5, 2), (7, 4)])
def test_torch_decode_right_padded_batch_2(torch_decode, lengths):
    """One decode step after a right-padded prefill of 2 equals each row run alone: for the
    rewritten pair with GQA's prefix mask, for the original with its append mask; and the
    two agree row by row."""
    _, decode, prefill = torch_decode
    rng = np.random.default_rng(sum(lengths))
    ids = rng.integers(0, 128, (2, lengths[0]), dtype=np.int64)
    new_ids = rng.integers(0, 128, (2, 1), dtype=np.int64)
    steps = {}
    for name, pair, convention in (
        ("original", (str(FIXTURES / TORCH_PREFILL), str(FIXTURES / TORCH_DECODE)), "append"),
        ("rewritten", (prefill, decode), "prefix"),
    ):
        sessions = [_session(path) for path in pair]
        batch = _padded_step(*sessions, ids, lengths, new_ids, convention)
        for row, n in enumerate(lengths):
            alone = _padded_step(
                *sessions, ids[row : row + 1, :n], (n,), new_ids[row : row + 1], convention
            )
            case = compare(f"{name} row {row} ({convention} mask)", alone, batch[row : row + 1])
            assert case.passed, case
        steps[name] = batch
    case = compare("original vs rewritten", steps["original"], steps["rewritten"])
    assert case.passed, case


# --- near misses of the trimmed sliding cache ---------------------------------------------


def _decode_value(model: ir.Model, name: str) -> ir.Value:
    return next(v for n in model.graph for v in n.outputs if v.name == name)


def _node_of(model: ir.Model, output: str) -> ir.Node:
    node = _decode_value(model, output).producer()
    assert node is not None
    return node


def _constant(model: ir.Model, name: str, value: int) -> ir.Value:
    constant = ir.Value(name=name, const_value=ir.tensor(np.array(value, dtype=np.int64)))
    model.graph.initializers[name] = constant
    return constant


def test_near_miss_shift_constant_other_than_the_trim():
    """Key positions shifted by Max(0, P - 6) while the caches keep the last 7 entries:
    every sliding layer refused, the full ones still rewritten."""
    model = ir.load(FIXTURES / TORCH_DECODE)
    add = _node_of(model, "add_4373")  # Add(-7, P) inside the shift Max(0, .)
    add.replace_input_with(0, _constant(model, "minus_six", -6))
    reasons = _skip_reasons(model)
    assert len(reasons) == 5, reasons
    for reason in reasons.values():
        assert reason.startswith("key positions are shifted by Max(0, P - 6): cache cat_")
        assert reason.endswith(
            "keeps its past from start [-7], the mask's key shift Max(0, P - 6) assumes the "
            "last 6 entries"
        ), reason


def test_near_miss_cache_trimmed_differently_from_the_shift():
    """One layer's own cache keeps the last 6 past entries, its mask shifts by P - 7."""
    model = ir.load(FIXTURES / TORCH_DECODE)
    _node_of(model, "slice_2").replace_input_with(1, _constant(model, "minus_six", -6))
    reasons = _skip_reasons(model)
    assert reasons == {
        "node_scaled_dot_product_attention": "key positions are shifted by Max(0, P - 7): "
        "cache cat_12 keeps its past from start [-6], the mask's key shift Max(0, P - 7) "
        "assumes the last 7 entries"
    }


def test_near_miss_shift_without_the_max():
    """Range(0, T) + (P - 7) is negative below a past of 7: not a count of dropped entries."""
    model = ir.load(FIXTURES / TORCH_DECODE)
    _node_of(model, "add_290").replace_input_with(1, _decode_value(model, "add_4373"))
    reasons = _skip_reasons(model)
    assert len(reasons) == 5, reasons
    assert all(
        r.startswith("key positions are Range(0, T, 1) shifted by something other than")
        for r in reasons.values()
    ), reasons


def test_near_miss_past_not_declared_as_long_as_the_shift_s():
    """The shift reads P off past_key_values.1.key; a past declared with another symbolic
    length cannot be proven to hold P entries."""
    model = ir.load(FIXTURES / TORCH_DECODE)
    for name in ("past_key_values.0.key", "past_key_values.0.value"):
        graph_input = next(v for v in model.graph.inputs if v.name == name)
        graph_input.shape = ir.Shape(["batch", 1, "past0", 16])
    reasons = _skip_reasons(model)
    assert reasons == {
        "node_scaled_dot_product_attention": "key shift's P is the length of "
        "past_key_values.1.key, not declared equal to that of past_key_values.0.key (the "
        "past the cache trims)"
    }


# --- transformers exporter, single-token decode graph (S fixed at 1) ----------------------


def test_transformers_single_token_pair_equals_the_original(tmp_path):
    pair = FIXTURES / TRANSFORMERS_PAIR
    rewritten = []
    for graph in ("prefill", "decode"):
        model, report = _rewrite(pair / f"{graph}.onnx")
        assert report.rewritten == 8 and not report.skipped, report.summary()
        ops = _ops(model)
        assert not [op for op in GONE if ops[op]], ops
        rewritten.append(_save(model, tmp_path / f"{graph}.onnx"))
    result = verify_pair((str(pair / "prefill.onnx"), str(pair / "decode.onnx")), tuple(rewritten))
    assert result.passed, result.summary()
    decode = next(c for c in result.checks if c.name == "decode_equivalence")
    assert decode.passed is True and len(decode.cases) > 0


def test_near_miss_new_entries_not_declared_as_many_as_the_queries():
    """The queries sit on the cache's last S slots only if the cache appends S entries."""
    model = ir.load(FIXTURES / TORCH_DECODE)
    new_keys = _node_of(model, "transpose_1").inputs[0]  # [B, S, 1, 16] before the Transpose
    assert new_keys is not None
    new_keys.shape = ir.Shape(["batch", "other", 1, 16])
    reasons = _skip_reasons(model)
    assert reasons == {
        "node_scaled_dot_product_attention": "cache cat_12 appends entries not declared as "
        "many as the queries (S)"
    }


# --- a decode graph that declares S = 1 (transformers' export_for_generation default) -----


def test_single_token_decode_graph_verifies_on_what_it_declares(tmp_path):
    """input_ids/position_ids [1, 1]: the verifier feeds calls of one token chained through
    the cache (past the window twice), and calls no declared limit a defect."""
    source = FIXTURES / TRANSFORMERS_PAIR / "decode.onnx"
    model, _ = _rewrite(source)
    result = rewriter.verify(source, _save(model, tmp_path / "d.onnx"), mode="model")
    assert result.passed, result.summary()
    assert result.defects == []
    checks = {(c.name, c.model): c for c in result.checks}
    prefill = checks[("prefill_equivalence", "candidate")]
    assert prefill.passed is True
    calls = [c for c in prefill.cases if c.label.startswith("call ")]
    # Window 8: the chain reaches 2W + 2 = 18 positions, one token per call.
    assert len({c.label.split(" (")[0] for c in calls}) == 18
    assert any(c.label.startswith("call 18 (positions 17..17)") for c in calls)
    for name in ("cache_consistency", "batch_consistency"):
        for role in ("original", "candidate"):
            assert checks[(name, role)].skipped
            assert "error" not in checks[(name, role)].detail


def test_single_token_decode_chain_catches_a_wrong_window(tmp_path):
    source = FIXTURES / TRANSFORMERS_PAIR / "decode.onnx"
    model, _ = _rewrite(source)
    for node in model.graph:
        if node.op_type == "GroupQueryAttention" and "local_window_size" in node.attributes:
            node.attributes["local_window_size"] = ir.AttrInt64("local_window_size", 7)
    result = rewriter.verify(source, _save(model, tmp_path / "d.onnx"), mode="model")
    assert not result.passed
    prefill = next(c for c in result.checks if c.name == "prefill_equivalence")
    failed = {c.label.split(" (")[0] for c in prefill.cases if not c.passed}
    # Position 7 sees key 0 with W=8 only: the first call to differ is the eighth.
    assert "call 8" in failed and "call 7" not in failed
