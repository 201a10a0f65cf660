"""Layer proofs of long windows (issue 21): the edge of a W=4096 window is crossed at a cost
linear in W (one query with keys at distance W-1, W and W+1), a window off by one is still
caught there, and what the runs do not reach is stated."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest

from rewriter.fixtures.gemma4_like import build_decoder, tiny_config
from rewriter.pipeline import rewrite
from rewriter.verification import verify
from rewriter.verification._layer_extract import LayerConfig, pair_layers
from rewriter.verification._layer_reference import (
    LINEAR_LIMIT,
    QUADRATIC_LIMIT,
    scenarios,
    window_note,
)

LONG_WINDOW = tiny_config(mask_style="p2", sliding_window=4096, max_position=8200)


@pytest.fixture(scope="module")
def long_window(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, onnx.ModelProto]:
    path = tmp_path_factory.mktemp("long_window") / "w4096.onnx"
    onnx.save(build_decoder(LONG_WINDOW), path)
    candidate, report = rewrite(ir.load(path))
    assert report.rewritten == 3
    return path, ir.to_proto(candidate)


def _sliding_config(window: int) -> LayerConfig:
    """A sliding KV-shared layer of the p2 fixture's config, with another window."""
    original = ir.from_proto(build_decoder(tiny_config(mask_style="p2")))
    candidate, _ = rewrite(ir.from_proto(build_decoder(tiny_config(mask_style="p2"))))
    pairs, _, _ = pair_layers(original, candidate)
    config = next(p.config for p in pairs if not isinstance(p, tuple) and p.config.window)
    return dataclasses.replace(config, window=window)


@pytest.mark.parametrize("window", [4, 512, 4096, 40_000])
def test_one_query_sees_the_window_edge_at_a_cost_linear_in_it(window: int) -> None:
    runs = scenarios(_sliding_config(window), window)
    quadratic = [s for s in runs if s.query_length == s.total_length]
    assert max(s.total_length for s in quadratic) <= QUADRATIC_LIMIT
    assert all(s.query_length <= 3 for s in runs if s.query_length != s.total_length)
    # A decode query at T = W + 2 has keys at distance W-1, W and W+1.
    decode_lengths = {s.total_length for s in runs if s.check == "decode"}
    assert window + 2 in decode_lengths
    assert any(s.check == "chunk" and s.total_length >= window + 2 for s in runs)
    assert any(s.check == "batch_decode" and s.total_length == window + 2 for s in runs)


def test_what_the_runs_do_not_reach_is_stated() -> None:
    assert window_note(_sliding_config(512)) == ""
    assert "prefill runs stop" in window_note(_sliding_config(4096))
    beyond = window_note(_sliding_config(LINEAR_LIMIT))
    assert "longer than any context the proof runs" in beyond
    runs = scenarios(_sliding_config(2**40), 2**40)
    assert max(s.total_length for s in runs) == LINEAR_LIMIT


def test_a_4096_window_is_proven_and_stated(long_window) -> None:
    path, candidate = long_window
    result = verify(path, ir.from_proto(candidate), mode="layers")
    assert result.passed, result.summary()
    sliding = [layer for layer in result.layers if "W=4096" in layer.config]
    assert sliding and all("prefill runs stop at T=1026" in layer.note for layer in sliding)


def test_a_4096_window_off_by_one_is_caught_past_the_prefill_limit(long_window) -> None:
    path, proto = long_window
    candidate = ir.from_proto(proto)
    node = next(
        n
        for n in candidate.graph
        if n.op_type == "GroupQueryAttention"
        and n.attributes.get("local_window_size") is not None
        and n.attributes["local_window_size"].as_int() == 4096
        and n.inputs[3] is not None
        and n.inputs[3].producer() is not None
    )
    node.attributes["local_window_size"] = ir.AttrInt64("local_window_size", 4097)
    result = verify(path, candidate, mode="layers")
    assert not result.passed
    broken = [layer for layer in result.layers if not layer.passed]
    assert len(broken) == 1
    failed = {c.name for c in broken[0].checks if c.model == "candidate" and c.passed is False}
    # Only runs that reach T = W + 2 can see it: the prefills stop at 1026.
    assert "prefill" not in failed and failed <= {"decode", "chunk", "batch_decode"} and failed
