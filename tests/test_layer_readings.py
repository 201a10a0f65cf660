"""The verifier reads rewritten layers on its own, on purpose: both readings must agree.

The rules record what they rewrote (``LayerRewrite``: head size, window, the cache read);
the verifier does not trust that record and reads each layer again from the original's
graph (``_layer_extract``), and the writer of every present cache from each model's graph
(``_graph_facts``). What they share is the ops' schema only (``rules._cache_writers``).
Two independent readings of the same models must say the same thing, or one of them is
wrong: these tests hold them to it on the fixtures and the corpus of real exports.
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import pytest
from conftest import CORPUS

from rewriter import rewrite
from rewriter.rules import LayerRewrite, NonSharedAttentionToGQA
from rewriter.rules._cache_writers import cache_write
from rewriter.verification._graph_facts import read_graph_facts
from rewriter.verification._layer_extract import OWN_CACHE, SHARED, LayerPair, pair_layers

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
# LayerRewrite.mask_style of a layer that keeps the export's own attention bias.
_EXPORT_BIAS = "export"

# Models whose rewritten layers the verifier cuts out. Not the HF exports: their replacement
# takes over a Reshape after the Attention (no cut, no layer proof), and their caches are
# named cache.layers.*, not present.*.
_LAYERED = ["p1_attention_full_tiny", "p1_tiny", "p1_tiny_fp16", "p2_all_attention_tiny"]
_LAYERED += ["p2_causal_tiny", "p2_tiny", "p2_tiny_opset24_explicit"]
_CORPUS_LAYERED = [
    "mobius-78437cd/assistant_drafter_f32.onnx",
    "mobius-78437cd/main_default_f16.onnx",
    "mobius-a80d6ad/p1_mixed_cpu_f32.onnx",
    "mobius-a80d6ad/p1_mixed_cuda_f16_d256_d512.onnx",
    "mobius-a80d6ad/p2_all_attention_default_f32.onnx",
]

LAYERED_MODELS = [pytest.param(FIXTURES / f"{name}.onnx", id=name) for name in _LAYERED] + [
    pytest.param(CORPUS / name, id=name, marks=pytest.mark.corpus) for name in _CORPUS_LAYERED
]
# Models whose present.* outputs an attention node writes (a drafter has none of its own).
CACHE_WRITING_MODELS = [param for param in LAYERED_MODELS if "drafter" not in param.id]


def _rewritten(path: Path) -> tuple[ir.Model, ir.Model, dict[str, LayerRewrite]]:
    original = ir.load(path)
    candidate, report = rewrite(ir.load(path))
    return original, candidate, {record.node: record for record in report.rewrites}


@pytest.mark.parametrize("path", LAYERED_MODELS)
def test_the_verifier_reads_each_rewritten_layer_as_the_rules_did(path: Path) -> None:
    original, candidate, rewrites = _rewritten(path)
    pairs, _, _ = pair_layers(original, candidate)
    layers = [pair for pair in pairs if isinstance(pair, LayerPair)]
    assert layers, "no layer cut out: nothing compared"
    for layer in layers:
        record = rewrites[layer.original_node]
        config = layer.config
        owns_cache = record.rule.split("/")[0] == NonSharedAttentionToGQA.__name__
        assert config.kind == (OWN_CACHE if owns_cache else SHARED), layer.original_node
        assert (config.head_size, config.dtype.name) == (record.head_size, record.dtype)
        if record.mask_style != _EXPORT_BIAS:
            # The rules read the window off the mask; with the export's own bias passed
            # through, the window stays in that bias and the rules state none.
            assert config.window == record.local_window_size, layer.original_node


@pytest.mark.parametrize("path", CACHE_WRITING_MODELS)
def test_the_verifier_names_the_cache_writer_the_rules_name(path: Path) -> None:
    original, candidate, _ = _rewritten(path)
    for model in (original, candidate):
        writers = read_graph_facts(model).cache_writers
        compared = 0
        for output in model.graph.outputs:
            write = cache_write(output)
            if output.name in writers and write is not None:
                assert writers[output.name] == write.writer.op_type, output.name
                compared += 1
        assert compared, "no present written by an attention node: nothing compared"
