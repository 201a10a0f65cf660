"""Tests of the fixture generator (``rewriter.fixtures.gemma4_like``).

Why: every rewrite rule and verifier test trusts these models to contain the exact KV-shared
subgraphs of SPEC.md section 2 -- including the P1 defects -- and the committed ``.onnx`` files
to be reproducible from code. These tests pin both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from rewriter.fixtures.gemma4_like import (
    FIXTURES,
    TINY_LAYER_TYPES,
    DecoderConfig,
    build_decoder,
    default_layer_types,
    tiny_config,
)

FIXTURE_DIR = Path(__file__).resolve().parent.parent / "fixtures"
PREFIX_LEN = 6  # > sliding_window (4), so the window matters in prefill and decode
DECODE_STEPS = 2

KV = dict[tuple[int, str], np.ndarray]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    """CPU session; FATAL-only logging because some tests provoke ORT errors on purpose."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _run(
    session: ort.InferenceSession,
    config: DecoderConfig,
    input_ids: np.ndarray,
    past: KV | None = None,
    attention_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, KV]:
    """One forward call; ``past=None`` means prefill with empty caches. Returns logits, presents."""
    batch, seq = input_ids.shape
    past_len = 0 if past is None else next(iter(past.values())).shape[2]
    dtype = np.float16 if config.dtype == "float16" else np.float32
    if attention_mask is None:
        attention_mask = np.ones((batch, past_len + seq), dtype=np.int64)
    positions = np.arange(past_len, past_len + seq, dtype=np.int64)
    feeds: dict[str, np.ndarray] = {
        "input_ids": input_ids.astype(np.int64),
        "attention_mask": attention_mask,
        "position_ids": np.broadcast_to(positions, (batch, seq)).copy(),
    }
    keys: list[tuple[int, str]] = []
    for layer in config.nonshared_layers:
        head_dim = config.head_dim(config.resolved_layer_types[layer])
        for kind in ("key", "value"):
            empty = np.zeros((batch, config.num_kv_heads, 0, head_dim), dtype=dtype)
            feeds[f"past_key_values.{layer}.{kind}"] = (
                empty if past is None else past[(layer, kind)]
            )
            keys.append((layer, kind))
    logits, *presents = session.run(None, feeds)
    return logits, dict(zip(keys, presents, strict=True))


def _decode_vs_prefill(config: DecoderConfig, seed: int = 1) -> tuple[float, float]:
    """Max |decode logits - full-prefill logits| over the decode steps, and the logits scale.

    SPEC.md section 6 oracle 2: prefill S tokens, then single-token decode steps feeding the
    presents back as past, must equal one prefill of S + k tokens at those positions.
    """
    session = _session(build_decoder(config))
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.vocab_size, (1, PREFIX_LEN + DECODE_STEPS))
    full, _ = _run(session, config, ids)
    _, past = _run(session, config, ids[:, :PREFIX_LEN])
    worst = 0.0
    for step in range(DECODE_STEPS):
        pos = PREFIX_LEN + step
        logits, past = _run(session, config, ids[:, pos : pos + 1], past)
        diff = np.abs(logits[0, 0].astype(np.float64) - full[0, pos].astype(np.float64)).max()
        worst = max(worst, float(diff))
    return worst, float(np.abs(full.astype(np.float64)).max())


def _ir_model(config: DecoderConfig) -> ir.Model:
    return ir.from_proto(build_decoder(config))


def _nodes(model: ir.Model, op_type: str, domain: str = "") -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == op_type and n.domain == domain]


def _const_ints(value: ir.Value | None) -> list[int]:
    assert value is not None and value.const_value is not None
    return [int(v) for v in value.const_value.numpy().reshape(-1)]


def _fixture_items() -> Iterator[tuple[str, DecoderConfig]]:
    yield from FIXTURES.items()


# ---------------------------------------------------------------------------------------------
# committed files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "config"), list(_fixture_items()))
def test_committed_fixture_is_reproducible_valid_and_runs(name: str, config: DecoderConfig) -> None:
    """Committed bytes == generator output; checker full_check passes; ORT CPU prefill runs."""
    path = FIXTURE_DIR / name
    assert path.is_file(), f"{path} missing: run `python -m rewriter.fixtures fixtures/`"
    data = path.read_bytes()
    assert len(data) < 1_000_000
    model = build_decoder(config)
    assert data == model.SerializeToString(), f"{name} is stale: regenerate the fixtures"
    onnx.checker.check_model(model, full_check=True)

    session = _session(model)
    ids = np.arange(PREFIX_LEN, dtype=np.int64)[None] % config.vocab_size
    logits, presents = _run(session, config, ids)
    assert logits.shape == (1, PREFIX_LEN, config.vocab_size)
    assert logits.dtype == (np.float16 if config.dtype == "float16" else np.float32)
    assert np.isfinite(logits).all()
    # Not degenerate: logits vary across the vocabulary and across positions.
    assert float(logits.astype(np.float32).std()) > 0.3
    for (layer, _kind), present in presents.items():
        head_dim = config.head_dim(config.resolved_layer_types[layer])
        assert present.shape == (1, config.num_kv_heads, PREFIX_LEN, head_dim)


def test_generation_is_deterministic_and_seeded() -> None:
    config = FIXTURES["p2_tiny.onnx"]
    first = build_decoder(config).SerializeToString()
    assert build_decoder(config).SerializeToString() == first
    assert build_decoder(dataclasses.replace(config, seed=1)).SerializeToString() != first


def test_io_signature() -> None:
    config = FIXTURES["p1_tiny.onnx"]
    graph = _ir_model(config).graph
    past = [f"past_key_values.{i}.{k}" for i in config.nonshared_layers for k in ("key", "value")]
    present = [f"present.{i}.{k}" for i in config.nonshared_layers for k in ("key", "value")]
    assert [v.name for v in graph.inputs] == ["input_ids", "attention_mask", "position_ids", *past]
    assert [v.name for v in graph.outputs] == ["logits", *present]
    by_name = {v.name: v for v in [*graph.inputs, *graph.outputs]}
    assert str(by_name["attention_mask"].shape) == "[batch,total_sequence_length]"
    assert str(by_name["past_key_values.1.key"].shape) == "[batch,1,past_sequence_length,16]"
    # As in real exports: the present's head size is symbolic, static on the past input.
    assert str(by_name["present.0.value"].shape) == "[batch,1,_d0,_d1]"
    static = _ir_model(dataclasses.replace(config, annotations="static")).graph
    static_present = next(v for v in static.outputs if v.name == "present.0.value")
    assert str(static_present.shape) == "[batch,1,total_sequence_length,8]"
    assert by_name["past_key_values.0.key"].dtype == ir.DataType.FLOAT


# ---------------------------------------------------------------------------------------------
# numerical behaviour (SPEC.md sections 2 and 6)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["p2_tiny.onnx", "p2_all_attention_tiny.onnx", "p2_tiny_opset24_explicit.onnx"]
)
def test_p2_without_is_causal_is_cache_consistent(name: str) -> None:
    diff, scale = _decode_vs_prefill(FIXTURES[name])
    assert diff < 1e-4 * scale, (diff, scale)


def test_p2_fp16_is_cache_consistent() -> None:
    diff, scale = _decode_vs_prefill(tiny_config(mask_style="p2", dtype="float16"))
    assert diff < 1e-2 * scale, (diff, scale)


@pytest.mark.parametrize("name", ["p1_tiny.onnx", "p2_causal_tiny.onnx", "p1_tiny_fp16.onnx"])
def test_is_causal_exports_are_not_cache_consistent(name: str) -> None:
    """The documented defect: is_causal=1 without past is upper-left aligned, so decode is wrong."""
    diff, scale = _decode_vs_prefill(FIXTURES[name])
    assert diff > 0.1 * scale, (diff, scale)


@pytest.mark.parametrize("name", ["p1_tiny.onnx", "p1_tiny_fp16.onnx"])
def test_p1_batch_two_fails_in_ort(name: str) -> None:
    """The documented defect: the 3D [B, S, T] mask is read as [heads, S, T]; B=2 != 4 heads."""
    config = FIXTURES[name]
    session = _session(build_decoder(config))
    ids = np.zeros((2, 3), dtype=np.int64)
    with pytest.raises(Exception, match="Attention"):
        _run(session, config, ids)


def test_p2_batch_two_runs() -> None:
    """Contrast to the P1 defect: the [B, 1, S, T] bias of P2 handles batch 2."""
    config = FIXTURES["p2_tiny.onnx"]
    logits, _ = _run(_session(build_decoder(config)), config, np.zeros((2, 3), dtype=np.int64))
    assert logits.shape == (2, 3, config.vocab_size)


# ---------------------------------------------------------------------------------------------
# graph structure (what the rewrite rules match)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n, c in FIXTURES.items() if c.nonshared_attention == "gqa"])
def test_shared_layers_borrow_through_one_transpose_reshape(name: str) -> None:
    config = FIXTURES[name]
    model = _ir_model(config)
    attentions = _nodes(model, "Attention")
    gqas = _nodes(model, "GroupQueryAttention", "com.microsoft")
    assert len(attentions) == len(config.shared_layers) == 3
    assert len(gqas) == len(config.nonshared_layers)
    # seqlens_k / total_sequence_length computed once and shared by all GQA nodes.
    assert len({id(g.inputs[5]) for g in gqas}) == 1
    assert len({id(g.inputs[6]) for g in gqas}) == 1

    sources = config.resolved_kv_sources()
    assert sources == {4: 2, 5: 2, 6: 3}
    outputs = {v.name: v for v in model.graph.outputs}
    for layer, node in zip(config.shared_layers, attentions, strict=True):
        src = sources[layer]
        head_dim = config.head_dim(config.resolved_layer_types[src])
        for slot, kind in ((1, "key"), (2, "value")):
            reshape = node.inputs[slot].producer()
            assert reshape is not None and reshape.op_type == "Reshape"
            expected = [0, 0, -1] if config.reshape_style == "minus1" else [0, 0, head_dim]
            assert _const_ints(reshape.inputs[1]) == expected
            transpose = reshape.inputs[0].producer()
            assert transpose is not None and transpose.op_type == "Transpose"
            assert list(transpose.attributes["perm"].as_ints()) == [0, 2, 1, 3]
            assert transpose.inputs[0] is outputs[f"present.{src}.{kind}"]
        attrs = {k: a.value for k, a in node.attributes.items()}
        causal = 1 if config.mask_style == "p1" else config.p2_is_causal
        assert attrs == {
            "is_causal": causal,
            "scale": 1.0,
            "softcap": 0.0,
            "q_num_heads": config.num_heads,
            "kv_num_heads": config.num_kv_heads,
        }
        assert len(node.outputs) == 1
        assert node.inputs[0].producer().op_type == "RotaryEmbedding"  # type: ignore[union-attr]

    # One Transpose per borrowed present value, shared by the layers borrowing it.
    transposes = _nodes(model, "Transpose")
    assert len(transposes) == 2 * len(set(sources.values()))
    assert attentions[0].inputs[1] is attentions[1].inputs[1]
    # One mask per layer type: both sliding shared layers consume the same mask value.
    assert attentions[0].inputs[3] is attentions[1].inputs[3]
    assert attentions[0].inputs[3] is not attentions[2].inputs[3]


def test_gqa_attributes() -> None:
    config = FIXTURES["p1_tiny.onnx"]
    gqas = _nodes(_ir_model(config), "GroupQueryAttention", "com.microsoft")
    for layer, node in zip(config.nonshared_layers, gqas, strict=True):
        attrs = {k: a.value for k, a in node.attributes.items()}
        expected = {"do_rotary": 0, "num_heads": 4, "kv_num_heads": 1, "scale": 1.0}
        if TINY_LAYER_TYPES[layer] == "sliding":
            expected["local_window_size"] = config.sliding_window
        assert attrs == expected
        assert [v.name for v in node.outputs[1:]] == [
            f"present.{layer}.key",
            f"present.{layer}.value",
        ]


def test_all_attention_build_has_no_gqa() -> None:
    config = FIXTURES["p2_all_attention_tiny.onnx"]
    model = _ir_model(config)
    assert not _nodes(model, "GroupQueryAttention", "com.microsoft")
    assert "com.microsoft" not in model.opset_imports
    attentions = _nodes(model, "Attention")
    assert len(attentions) == config.num_layers
    for layer, node in enumerate(attentions):
        shared = layer in config.shared_layers
        assert len(node.inputs) == (4 if shared else 6)
        assert len(node.outputs) == (1 if shared else 3)


def _mask_ops(config: DecoderConfig) -> list[str]:
    model = _ir_model(config)
    return sorted(n.op_type for n in model.graph if n.name and n.name.startswith("/model/mask"))


def test_mask_chains_follow_spec() -> None:
    p1 = _ir_model(FIXTURES["p1_tiny.onnx"])
    p1_attn = _nodes(p1, "Attention")
    assert p1_attn[0].inputs[3].producer().op_type == "And"  # type: ignore[union-attr]
    assert p1_attn[2].inputs[3].producer().op_type == "Expand"  # type: ignore[union-attr]
    assert "Where" not in _mask_ops(FIXTURES["p1_tiny.onnx"])

    p2 = _ir_model(FIXTURES["p2_tiny.onnx"])
    for node in _nodes(p2, "Attention"):
        unsqueeze = node.inputs[3].producer()
        assert unsqueeze is not None and unsqueeze.op_type == "Unsqueeze"
        where = unsqueeze.inputs[0].producer()
        assert where is not None and where.op_type == "Where"
        neg = where.inputs[2]
        assert neg is not None and neg.const_value is not None
        assert float(neg.const_value.numpy()) == np.float32(-3.4028235e38)
        assert neg.const_value.shape.dims == ()  # scalar constants are 0-D
    window = p2.graph.initializers["const_sliding_window"]
    assert window.const_value is not None and window.const_value.shape.dims == ()
    assert int(window.const_value.numpy()) == FIXTURES["p2_tiny.onnx"].sliding_window
    cumsum = _nodes(p2, "CumSum")[0]
    assert cumsum.inputs[0] is p2.graph.inputs[1]
    assert cumsum.inputs[1].const_value.shape.dims == ()  # type: ignore[union-attr]
    ops = _mask_ops(FIXTURES["p2_tiny.onnx"])
    assert ops.count("Less") == 1 and ops.count("GreaterOrEqual") == 2

    fp16 = _ir_model(tiny_config(mask_style="p2", dtype="float16"))
    where = _nodes(fp16, "Where")[0]
    cast_like = where.inputs[2].producer()
    assert cast_like is not None and cast_like.op_type == "CastLike"
    assert float(cast_like.inputs[0].const_value.numpy()) == -65504.0  # type: ignore[union-attr]
    # The cumulative positions are computed once for all masks.
    assert len(_nodes(fp16, "CumSum")) == 1


def test_microsoft_rotary_and_opset24() -> None:
    config = FIXTURES["p2_tiny_opset24_explicit.onnx"]
    model = _ir_model(config)
    assert model.opset_imports[""] == 24
    assert not _nodes(model, "RotaryEmbedding")
    assert len(_nodes(model, "RotaryEmbedding", "com.microsoft")) == 7 + 4


# ---------------------------------------------------------------------------------------------
# config validation
# ---------------------------------------------------------------------------------------------


def test_default_layer_types() -> None:
    assert default_layer_types(7) == ("sliding",) * 4 + ("full", "sliding", "sliding")


def test_kv_source_resolution() -> None:
    assert tiny_config().resolved_kv_sources() == {4: 2, 5: 2, 6: 3}
    explicit = tiny_config(kv_sources=(0, 2, 1))
    assert explicit.resolved_kv_sources() == {4: 0, 5: 2, 6: 1}
    model = _ir_model(explicit)
    transposes = {n.inputs[0].name for n in _nodes(model, "Transpose")}  # type: ignore[union-attr]
    assert transposes == {f"present.{i}.{k}" for i in (0, 1, 2) for k in ("key", "value")}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({}, "no earlier non-shared 'full' layer"),  # the bare DecoderConfig() layout
        ({"num_heads": 3, "num_kv_heads": 2}, "divisible"),
        ({"head_dim_full": 7}, "even"),
        ({"num_kv_shared_layers": 7}, "num_kv_shared_layers"),
        ({"layer_types": ("sliding",) * 4}, "layer_types has 4 entries"),
        ({"kv_sources": (0, 1)}, "kv_sources has 2 entries"),
        ({"dtype": "bfloat16"}, "dtype"),
        ({"p2_is_causal": 1}, "p2_is_causal only applies"),
        ({"attention_opset": 22}, "attention_opset"),
    ],
)
def test_invalid_configs_raise(overrides: dict[str, object], message: str) -> None:
    base = DecoderConfig() if not overrides else tiny_config()
    config = dataclasses.replace(base, **overrides)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        build_decoder(config)


def test_kv_source_must_match_type() -> None:
    with pytest.raises(ValueError, match="same layer type"):
        build_decoder(tiny_config(kv_sources=(1, 2, 3)))
