"""Property 4: the pass is idempotent, and a model without KV-shared layers is left alone."""

from __future__ import annotations

import onnx
import pytest
from hypothesis import given, note
from strategies import decoder_configs, no_shared_configs

import rewriter
from rewriter.fixtures.gemma4_like import DecoderConfig, build_decoder

pytestmark = pytest.mark.property


def _nodes(model: onnx.ModelProto) -> list[bytes]:
    return [node.SerializeToString(deterministic=True) for node in model.graph.node]


def _initializers(model: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: t.SerializeToString(deterministic=True) for t in model.graph.initializer}


def _signature(model: onnx.ModelProto) -> list[bytes]:
    values = [*model.graph.input, *model.graph.output]
    return [v.SerializeToString(deterministic=True) for v in values]


def assert_same_graph(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    assert _nodes(after) == _nodes(before)
    assert _initializers(after) == _initializers(before)
    assert _signature(after) == _signature(before)
    assert after.opset_import == before.opset_import


@given(config=decoder_configs(max_head_size=64))
def test_rewriting_a_rewritten_model_changes_nothing(config: DecoderConfig) -> None:
    once, first = rewriter.rewrite(build_decoder(config))
    twice, second = rewriter.rewrite(once)
    note(first.summary())
    note(second.summary())
    assert second.rewrites == []
    # What the first pass left alone it leaves alone again, for the same reason.
    assert [(s.node, s.reason) for s in second.skipped] == [
        (s.node, s.reason) for s in first.skipped
    ]
    assert_same_graph(once, twice)
    # The record of the first pass (rewrites, forms, padding contract) is what the verifier
    # and users read: a pass that rewrites nothing must not overwrite it.
    assert {p.key: p.value for p in twice.metadata_props} == {
        p.key: p.value for p in once.metadata_props
    }


@given(config=no_shared_configs())
def test_a_model_without_kv_shared_layers_is_unchanged(config: DecoderConfig) -> None:
    original = build_decoder(config)
    rewritten, report = rewriter.rewrite(original, layers="shared")
    note(report.summary())
    assert report.rewrites == []
    assert_same_graph(original, rewritten)
    if config.nonshared_attention == "gqa":
        # No Attention node at all: the default pass has nothing to do either.
        rewritten, report = rewriter.rewrite(original)
        assert report.rewrites == [] and report.skipped == []
        assert_same_graph(original, rewritten)
