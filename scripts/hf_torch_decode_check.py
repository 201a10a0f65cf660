"""Numbers for the torch.onnx decode graph with trimmed sliding caches (docs/rules.md, Hugging Face
exports): ``python scripts/hf_torch_decode_check.py``.

Rewrites ``fixtures/hf_torch_{prefill,decode}_opset24.onnx`` (default options) and prints, on
ONNX Runtime CPU, with the verifier's tolerances (``rewriter.verification._tolerance``):

1. original vs rewritten decode, every past of the same length P, worst output per shape;
2. cache consistency per model: a prefill's (trimmed) presents fed to decode steps, against
   one longer prefill, prompts below, at and beyond the window W = 8;
3. one decode step after a right-padded prefill of 2, against each row run alone (the
   original with its append mask, the rewritten model with GQA's prefix mask).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

import rewriter
from rewriter.verification._tolerance import compare

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PREFILL = FIXTURES / "hf_torch_prefill_opset24.onnx"
DECODE = FIXTURES / "hf_torch_decode_opset24.onnx"


def _session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _names(session) -> list[str]:
    return [o.name for o in session.get_outputs()]


def _prefill(session, ids, mask=None) -> dict[str, np.ndarray]:
    mask = np.ones_like(ids) if mask is None else mask
    outputs = session.run(None, {"input_ids": ids, "attention_mask": mask})
    return dict(zip(_names(session), outputs, strict=True))


def _decode(session, ids, mask, positions, presents) -> dict[str, np.ndarray]:
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    for graph_input in session.get_inputs()[3:]:
        feeds[graph_input.name] = presents[graph_input.name.replace("past_key_values", "present")]
    return dict(zip(_names(session), session.run(None, feeds), strict=True))


def _worst(cases) -> str:
    worst = max(cases, key=lambda c: c.max_abs_diff / max(c.tolerance, 1e-30))
    verdict = "pass" if all(c.passed for c in cases) else "FAIL"
    return (
        f"{verdict} max|diff| {worst.max_abs_diff:.2e} (tol {worst.tolerance:.1e}, {worst.label})"
    )


def equivalence(original, candidate) -> None:
    print("1. original vs rewritten decode, all pasts of length P")
    rng = np.random.default_rng(0)
    for batch, past, length in ((1, 0, 1), (1, 1, 1), (2, 6, 1), (1, 5, 3), (2, 7, 1), (1, 7, 3),
                                (1, 8, 1), (2, 12, 1)):  # fmt: skip
        feeds = {
            "input_ids": rng.integers(0, 128, (batch, length), dtype=np.int64),
            "attention_mask": np.ones((batch, past + length), dtype=np.int64),
            "position_ids": np.broadcast_to(np.arange(past, past + length), (batch, length)).copy(),
        }
        for graph_input in original.get_inputs()[3:]:
            shape = (batch, 1, past, graph_input.shape[3])
            feeds[graph_input.name] = rng.standard_normal(shape).astype(np.float32)
        label = f"   B={batch} P={past} S={length}:"
        actual = candidate.run(None, feeds)
        try:
            reference = original.run(None, feeds)
        except Exception as error:  # the export's own defect from P = W on
            print(label, f"original fails ({str(error).split(':')[-1].strip()[:60]}); "
                  f"rewritten runs, finite={bool(np.all(np.isfinite(actual[0])))}")  # fmt: skip
            continue
        names = _names(original)
        print(
            label,
            _worst([compare(n, r, a) for n, r, a in zip(names, reference, actual, strict=True)]),
        )


def consistency(pairs) -> None:
    print("2. cache consistency: prefill presents fed back to decode, vs one longer prefill")
    ids = np.random.default_rng(1).integers(0, 128, (1, 24), dtype=np.int64)
    for name, (prefill, decode) in pairs.items():
        for length in (1, 3, 6, 7, 8, 11, 17):
            for chunks in ((1, 1, 1), (3,)):
                full = _prefill(prefill, ids[:, : length + sum(chunks)])["logits"]
                presents = _prefill(prefill, ids[:, :length])
                cases, position = [], length
                try:
                    for chunk in chunks:
                        mask = np.ones((1, position + chunk), dtype=np.int64)
                        positions = np.arange(position, position + chunk)[None]
                        presents = _decode(
                            decode, ids[:, position : position + chunk], mask, positions, presents
                        )
                        label = f"tokens {position}..{position + chunk - 1}"
                        cases.append(
                            compare(label, full[:, position : position + chunk], presents["logits"])
                        )
                        position += chunk
                    result = _worst(cases)
                except Exception as error:
                    result = f"fails at tokens {position}.. ({str(error).split(':')[-1][:50]})"
                print(f"   {name:9} prompt {length:2} steps {chunks}: {result}")


def _padded_step(prefill, decode, ids, new, lengths, convention: str) -> np.ndarray:
    """Prefill rows of `lengths` tokens right-padded to ids.shape[1], then one token each,
    placed right after the row's tokens ("prefix") or after the padding ("append")."""
    padded = ids.shape[1]
    mask = np.zeros((len(lengths), padded), dtype=np.int64)
    step_mask = np.zeros((len(lengths), padded + 1), dtype=np.int64)
    for i, n in enumerate(lengths):
        mask[i, :n] = step_mask[i, :n] = 1
        step_mask[i, n if convention == "prefix" else padded] = 1
    presents = _prefill(prefill, ids, mask)
    positions = np.array([[n] for n in lengths], dtype=np.int64)
    return _decode(decode, new, step_mask, positions, presents)["logits"]


def padded_batch(pairs) -> None:
    print("3. right-padded prefill of 2, one decode step, vs each row alone")
    rng = np.random.default_rng(2)
    for lengths in ((6, 3), (5, 2), (7, 4)):
        ids = rng.integers(0, 128, (2, lengths[0]), dtype=np.int64)
        new = rng.integers(0, 128, (2, 1), dtype=np.int64)
        for name, (prefill, decode) in pairs.items():
            for convention in ("append", "prefix"):
                batch = _padded_step(prefill, decode, ids, new, lengths, convention)
                cases = [
                    compare(
                        f"row {row}",
                        _padded_step(
                            prefill, decode, ids[row : row + 1, :n], new[row : row + 1], [n],
                            convention,
                        ),
                        batch[row : row + 1],
                    )
                    for row, n in enumerate(lengths)
                ]  # fmt: skip
                print(f"   {name:9} rows {lengths} {convention:6} mask: {_worst(cases)}")


def main() -> int:
    print(f"onnxruntime {ort.__version__}, CPU")
    with tempfile.TemporaryDirectory() as directory:
        paths = {}
        for graph, path in (("prefill", PREFILL), ("decode", DECODE)):
            model, report = rewriter.rewrite(ir.load(path))
            kinds = sorted(f"{r.node.rsplit('_', 1)[-1]}:{r.rule.split('/')[-1]}/{r.form}"
                           for r in report.rewrites)  # fmt: skip
            print(f"{path.name}: {report.rewritten} rewritten, {len(report.skipped)} skipped")
            print(f"   {' '.join(kinds)}")
            paths[graph] = Path(directory) / f"{graph}.onnx"
            ir.save(model, paths[graph])
        pairs = {
            "original": (_session(PREFILL), _session(DECODE)),
            "rewritten": (_session(paths["prefill"]), _session(paths["decode"])),
        }
        equivalence(pairs["original"][1], pairs["rewritten"][1])
        consistency(pairs)
        padded_batch(pairs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
