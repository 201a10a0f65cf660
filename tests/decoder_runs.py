"""Running the fixture decoders on ONNX Runtime: feeds for prefill and decode steps.

Kept independent of rewriter.verification on purpose: the rewrite's own tests should fail
because the rewrite is wrong, not because the verifier is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

FIXTURES = (
    "p1_tiny",
    "p1_tiny_fp16",
    "p2_tiny",
    "p2_causal_tiny",
    "p2_all_attention_tiny",
    "p2_tiny_opset24_explicit",
)


def borrowed_cache(past: ir.Value) -> ir.Value:
    """The cache a rewritten layer's past input reads: sliding KV-shared layers read a Slice
    of it, the keys their window reaches (rules/_gqa_inputs.py, window_slice)."""
    producer = past.producer()
    if producer is not None and producer.op_type == "Slice":
        return producer.inputs[0]
    return past


# Relative to max(1, max|reference|): fixed per dtype, never tuned per model (SPEC.md 6).
TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float16): 1e-2}


class Decoder:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.session = ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.dtype = (
            np.float16 if "float16" in self.inputs[self._past_names()[0]].type else np.float32
        )

    def _past_names(self) -> list[str]:
        return [n for n in self.inputs if n.startswith("past_key_values.")]

    def run(self, ids: np.ndarray, mask: np.ndarray, past: dict[str, np.ndarray] | None = None):
        batch, length = ids.shape
        total = mask.shape[1]
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, total - length :]
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        for name in self._past_names():
            if past is None:
                info = self.inputs[name]
                feeds[name] = np.zeros((batch, info.shape[1], 0, info.shape[3]), self.dtype)
            else:
                feeds[name] = past[name.replace("past_key_values", "present")]
        return dict(zip(self.outputs, self.session.run(None, feeds), strict=True))

    def prefill_then_decode(self, ids: np.ndarray, prefill: int) -> np.ndarray:
        """Logits of each decoded position: prefill `prefill` tokens, then one token a step."""
        batch = ids.shape[0]
        result = self.run(ids[:, :prefill], np.ones((batch, prefill), np.int64))
        logits = []
        for t in range(prefill, ids.shape[1]):
            result = self.run(ids[:, t : t + 1], np.ones((batch, t + 1), np.int64), result)
            logits.append(result["logits"][:, -1])
        return np.stack(logits, axis=1)


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    reference64 = reference.astype(np.float64)
    scale = max(1.0, float(np.abs(reference64).max()))
    return float(np.abs(actual.astype(np.float64) - reference64).max()) / scale


def tokens(length: int, batch: int = 1, seed: int = 0, vocab: int = 37) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length), dtype=np.int64)


def chained_hf_logits(
    paths: tuple[Path, Path], tokens: np.ndarray, lengths: Sequence[int], window: int
) -> list[np.ndarray]:
    """A transformers-exporter pair run call by call: the prefill graph, then the decode graph
    fed its own presents; the logits of each call (rows of ``tokens``, ``lengths`` per call)."""
    prefill, decode = (
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]) for path in paths
    )
    rows = tokens.shape[0]
    session, start, outputs, runs = prefill, 0, {}, []
    for length in lengths:
        feeds: dict[str, np.ndarray] = {
            "input_ids": tokens[:, start : start + length],
            "position_ids": np.tile(np.arange(start, start + length), (rows, 1)),
        }
        for graph_input in session.get_inputs():
            name = graph_input.name
            if name.endswith("_sliding_window_tensor"):
                feeds[name] = np.array(window, dtype=np.int64)
            elif name.startswith("input.cache.layers."):
                feeds[name] = outputs[name.replace("input.", "output.", 1)]
        names = [o.name for o in session.get_outputs()]
        result = dict(zip(names, session.run(names, feeds), strict=True))
        outputs = {
            name if name.startswith("output.") else f"output.{name}": value
            for name, value in result.items()
        }
        runs.append(result["logits"])
        start += length
        session = decode
    return runs
