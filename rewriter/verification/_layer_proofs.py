"""Layer proofs: each rewritten layer, cut out of both models, against a float64 reference.

For every rewritten layer (``_layer_extract``) the original subgraph and its replacement run
on ONNX Runtime over the scenarios of ``_layer_reference`` (prefill, decode, a chunk after a
past, lengths around W, right-padded batch 2) at the layer's own N, Nkv, D, W, scale,
softcap and dtype. The *candidate* is judged against the reference with the fixed tolerance
of its dtype; where the *original* disagrees with the reference (P1 exports: upper-left
is_causal in decode, a 3-D mask at B = 2), that is reported as the original's defect for the
layer and does not count against the candidate.

The subgraphs hold no weights, so a proof costs a few MB whatever the model's size. Layers
whose standalone original and replacement serialize to identical bytes (same structure,
constants and meaning: e.g. the 16 sliding KV-shared layers of Gemma 4 E2B) compute the same
function on the same feeds, so one ONNX Runtime run proves all of them; each such layer's
entry names the layer whose run it shares (``dedupe=False`` runs every layer).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from rewriter.verification._layer_extract import (
    OUTPUT,
    LayerConfig,
    LayerPair,
    Unprovable,
    pair_layers,
)
from rewriter.verification._layer_reference import (
    Scenario,
    ScenarioData,
    make_data,
    scenarios,
    window_note,
)
from rewriter.verification._result import Case, CheckResult
from rewriter.verification._session import execution_providers, short_error
from rewriter.verification._tolerance import RELATIVE_TOLERANCE

__all__ = ["LayerProof", "LayerProofs", "prove_layers"]

CANDIDATE, ORIGINAL = "candidate", "original"
_DEFAULT_WINDOW = 8  # lengths for models without any sliding layer, as the model check uses

_UPPER_LEFT = (
    "likely cause: Attention is_causal=1 without past inputs is aligned to the upper left "
    "(ONNX spec): a query shorter than the keys sees only the first keys"
)
_MASK_3D = (
    "likely cause: the Attention takes a 3-D [B,S,T] attn_mask, which ONNX reads as "
    "[q_num_heads,S,T]"
)


@dataclasses.dataclass
class LayerProof:
    """The proof of one rewritten layer. ``passed``: every candidate check ran and holds."""

    node: str  # the original Attention (as the rewrite report's `node`)
    replacement: str  # the candidate's GroupQueryAttention
    passed: bool
    config: str = ""
    checks: list[CheckResult] = dataclasses.field(default_factory=list)
    original_defects: list[str] = dataclasses.field(default_factory=list)
    proof_shared_with: str | None = None  # node whose identical subgraphs were run
    reason: str = ""  # why there is no proof, when there is none
    seconds: float = 0.0
    # Whether the layer's nodes are known (always, with a proof): the graph diff needs them.
    nodes_known: bool = True
    # What the scenarios could not reach (a window longer than the runs), in words.
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "node": self.node,
            "replacement": self.replacement,
            "passed": self.passed,
            "config": self.config,
            "checks": [check.to_dict() for check in self.checks],
            "original_defects": list(self.original_defects),
            "seconds": round(self.seconds, 3),
        }
        if self.proof_shared_with:
            out["proof_shared_with"] = self.proof_shared_with
        if self.reason:
            out["reason"] = self.reason
        if self.note:
            out["note"] = self.note
        return out

    def summary(self) -> str:
        if self.reason:
            return f"FAIL layer {self.node}: no proof: {self.reason}"
        status = "PASS" if self.passed else "FAIL"
        failed = [c for c in self.checks if c.model == CANDIDATE and c.passed is False]
        worst = max(
            (c for c in self.checks if c.model == CANDIDATE and c.max_abs_diff is not None),
            key=lambda c: (c.passed is False, (c.max_abs_diff or 0) / (c.tolerance or 1)),
            default=None,
        )
        line = f"{status} layer {self.node} ({self.config})"
        if failed:
            line += f": {failed[0].name}: {failed[0].detail}"
        elif worst is not None:
            line += f" max_abs_diff={worst.max_abs_diff:.3g} tolerance={worst.tolerance:.3g}"
        if self.proof_shared_with:
            line += f" [same subgraphs as {self.proof_shared_with}]"
        if self.note:
            line += f" ({self.note})"
        return line


@dataclasses.dataclass
class LayerProofs:
    layers: list[LayerProof]
    # Nodes of each graph inside some rewritten layer: the graph diff ignores them.
    original_layer_nodes: frozenset[ir.Node]
    candidate_layer_nodes: frozenset[ir.Node]
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(layer.passed for layer in self.layers)

    @property
    def original_defects(self) -> list[str]:
        """One line per defect, naming every layer that has it (identical layers share)."""
        layers_with: dict[str, list[str]] = {}
        for layer in self.layers:
            for defect in layer.original_defects:
                layers_with.setdefault(defect, []).append(layer.node)
        return [
            f"layer{'s' if len(nodes) > 1 else ''} {', '.join(nodes)}: {defect}"
            for defect, nodes in layers_with.items()
        ]


def prove_layers(
    original: ir.Model,
    candidate: ir.Model,
    *,
    provider: str = "cpu",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    dedupe: bool = True,
) -> LayerProofs:
    report = progress or (lambda _message: None)
    start = time.perf_counter()
    pairs, original_nodes, candidate_nodes = pair_layers(original, candidate)
    window = _model_window(pairs)
    providers = execution_providers(provider)
    proofs: list[LayerProof] = []
    by_fingerprint: dict[str, LayerProof] = {}
    for index, pair in enumerate(pairs, start=1):
        if isinstance(pair, tuple):
            node, replacement, reason, nodes_known = pair
            report(f"layer {index}/{len(pairs)} {node}: no proof: {reason}")
            proofs.append(
                LayerProof(node, replacement, passed=False, reason=reason, nodes_known=nodes_known)
            )
            continue
        known = by_fingerprint.get(pair.fingerprint) if dedupe else None
        if known is not None:
            proofs.append(
                dataclasses.replace(
                    known,
                    node=pair.original_node,
                    replacement=pair.node,
                    proof_shared_with=known.node,
                    seconds=0.0,
                )
            )
            report(
                f"layer {index}/{len(pairs)} {pair.original_node}: same subgraphs as {known.node}"
            )
            continue
        report(f"layer {index}/{len(pairs)} {pair.original_node} ({pair.config.describe()})")
        proof = _prove(pair, window, providers, seed, report)
        by_fingerprint[pair.fingerprint] = proof
        proofs.append(proof)
    return LayerProofs(proofs, original_nodes, candidate_nodes, time.perf_counter() - start)


def _model_window(pairs: Sequence[LayerPair | Unprovable]) -> int:
    windows = [p.config.window for p in pairs if isinstance(p, LayerPair) and p.config.window]
    return max(windows) if windows else _DEFAULT_WINDOW


def _prove(
    pair: LayerPair,
    window: int,
    providers: list[str],
    seed: int,
    report: Callable[[str], None],
) -> LayerProof:
    start = time.perf_counter()
    config = pair.config
    proof = LayerProof(
        pair.original_node,
        pair.node,
        passed=False,
        config=config.describe(),
        note=window_note(config),
    )
    try:
        candidate = _session(pair.candidate_bytes, providers)
    except Exception as error:
        proof.reason = f"ONNX Runtime cannot load the replacement: {short_error(error)}"
        return proof
    try:
        original: ort.InferenceSession | None = _session(pair.original_bytes, providers)
        original_error = ""
    except Exception as error:
        original, original_error = None, short_error(error)
    dtypes = {
        role: np.dtype(dtype.numpy())
        for role, dtype in {**pair.original_inputs, **pair.candidate_inputs}.items()
    }
    grouped: dict[str, list[Scenario]] = {}
    for scenario in scenarios(config, config.window or window):
        grouped.setdefault(scenario.check, []).append(scenario)
    for check, group in grouped.items():
        report(f"  {check}: {len(group)} case(s)")
        cases: dict[str, list[Case]] = {CANDIDATE: [], ORIGINAL: []}
        errors: dict[str, str] = {}
        if original is None:
            errors[ORIGINAL] = f"ONNX Runtime cannot load it: {original_error}"
        for number, scenario in enumerate(group):
            data = make_data(config, scenario, seed * 1000 + number, dtypes)
            runs = (
                (CANDIDATE, candidate, pair.candidate_inputs),
                (ORIGINAL, original, pair.original_inputs),
            )
            for role, session, inputs in runs:
                if role in errors or session is None:
                    continue
                try:
                    outputs = _run(session, inputs, pair.outputs, data)
                except Exception as error:
                    errors[role] = f"{scenario.label}: {short_error(error)}"
                    continue
                cases[role] += _compare(scenario, data, outputs, config)
        for role in (CANDIDATE, ORIGINAL):
            if role in errors:
                result = CheckResult.error(check, role, errors[role])
            else:
                result = CheckResult.from_cases(check, role, cases[role], "reference: float64")
            proof.checks.append(result)
            report(f"    {result.summary()}")
            if role == ORIGINAL and result.passed is False:
                fixed = proof.checks[-2].passed is True  # the candidate's run of this check
                status = "fixed by the rewrite" if fixed else "not fixed by the rewrite"
                proof.original_defects.append(f"{_defect(check, result, config)}; {status}")
    proof.passed = all(check.passed is True for check in proof.checks if check.model == CANDIDATE)
    proof.seconds = time.perf_counter() - start
    return proof


def _session(model: bytes, providers: list[str]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    return ort.InferenceSession(model, sess_options=options, providers=providers)


def _run(
    session: ort.InferenceSession,
    inputs: dict[str, ir.DataType],
    outputs: tuple[str, ...],
    data: ScenarioData,
) -> dict[str, np.ndarray]:
    feeds = {role: data.feeds[role] for role in inputs}
    values = session.run(list(outputs), feeds)
    return dict(zip(outputs, values, strict=True))


def _compare(
    scenario: Scenario, data: ScenarioData, outputs: dict[str, np.ndarray], config: LayerConfig
) -> list[Case]:
    cases = []
    for role, actual in outputs.items():
        expected = data.expected[role]
        label = f"{scenario.label} {role}"
        if role == OUTPUT:
            rows = data.valid_queries  # [B, S]
        else:
            # A present cache [B, Nkv, T, D]: only valid key slots are defined.
            rows = data.valid_keys
            expected = expected.transpose(0, 2, 1, 3)  # -> [B, T, Nkv, D]
            if actual.ndim == 4:
                actual = actual.transpose(0, 2, 1, 3)
        if actual.shape[:2] != expected.shape[:2]:
            cases.append(
                Case(label, np.inf, 0.0, False, f"shape {actual.shape} != {expected.shape}")
            )
            continue
        cases.append(_case(label, expected[rows], actual[rows], config.dtype))
    return cases


def _case(label: str, expected: np.ndarray, actual: np.ndarray, dtype: np.dtype) -> Case:
    """Fixed tolerance of the layer's dtype relative to the reference's scale."""
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    tolerance = RELATIVE_TOLERANCE[np.dtype(dtype)] * max(1.0, scale)
    if actual.shape != expected.shape:
        return Case(label, np.inf, tolerance, False, f"shape {actual.shape} != {expected.shape}")
    if not np.all(np.isfinite(actual)):
        return Case(label, np.inf, tolerance, False, "non-finite values (NaN/inf) in the output")
    if not expected.size:
        return Case(label, 0.0, tolerance, True)
    diff = float(np.max(np.abs(actual.astype(np.float64) - expected)))
    return Case(label, diff, tolerance, diff <= tolerance)


def _defect(check: str, result: CheckResult, config: LayerConfig) -> str:
    if result.detail.startswith("error: "):
        text = f"{check}: fails on ONNX Runtime: {result.detail[len('error: ') :]}"
    else:
        text = (
            f"{check}: differs from the reference by {result.max_abs_diff:.3g} "
            f"(tolerance {result.tolerance:.3g}) at {result.detail}"
        )
    cause = ""
    if check.startswith("batch") and config.mask_rank == 3 and "error" in result.detail:
        cause = _MASK_3D
    elif check in ("decode", "chunk", "batch_decode") and config.upper_left_causal:
        cause = _UPPER_LEFT
    return f"{text}; {cause}" if cause else text
