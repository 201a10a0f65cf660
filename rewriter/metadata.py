"""The ``kvshare_gqa_rewriter.*`` keys written into every rewritten model.

They are how a later run tells a rewritten model from an original (``model_io``), which
padding contract the verifier holds the rewrite to (``verification``), and what a reader of
the model file can learn without the report. One spelling for the writer and its readers;
the module imports nothing of the rewrite, so the verifier reading it stays independent of
the code it checks.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import onnx

from rewriter import __version__

if TYPE_CHECKING:
    import onnx_ir as ir

    from rewriter.report import RewriteReport

__all__ = [
    "FORCED_KEY",
    "FORMS_KEY",
    "METADATA_PREFIX",
    "PADDING_CONTRACT_KEY",
    "PROBED_ON_KEY",
    "REWRITES_KEY",
    "SPEED_KEY",
    "VERIFICATION_KEY",
    "VERSION_KEY",
    "record_metadata",
    "record_verification",
]

METADATA_PREFIX = "kvshare_gqa_rewriter."
VERSION_KEY = METADATA_PREFIX + "version"
REWRITES_KEY = METADATA_PREFIX + "rewrites"
FORMS_KEY = METADATA_PREFIX + "forms"
PADDING_CONTRACT_KEY = METADATA_PREFIX + "padding_contract"
PROBED_ON_KEY = METADATA_PREFIX + "probed_on"
FORCED_KEY = METADATA_PREFIX + "forced"
# --speed auto: per layer kind, the forms chosen and the median ms per call they rest on.
SPEED_KEY = METADATA_PREFIX + "speed"
# What the verifier proved before the file was written: the verdict and what it rests on.
VERIFICATION_KEY = METADATA_PREFIX + "verification"


def record_metadata(model: ir.Model, report: RewriteReport, probed_on: str | None) -> None:
    """`probed_on`: the runtime and provider the form probe ran on, if it ran."""
    if not report.rewrites and REWRITES_KEY in model.metadata_props:
        # A pass over an already rewritten model that changes nothing keeps the first pass's
        # record: its padding contract still holds, and the verifier reads it.
        return
    model.metadata_props[VERSION_KEY] = __version__
    model.metadata_props[REWRITES_KEY] = str(report.rewritten)
    forms = sorted({r.form for r in report.rewrites})
    if forms:
        model.metadata_props[FORMS_KEY] = ",".join(forms)
    model.metadata_props[PADDING_CONTRACT_KEY] = report.padding_contract
    if probed_on is not None:
        model.metadata_props[PROBED_ON_KEY] = probed_on
    if report.forced:
        model.metadata_props[FORCED_KEY] = "true"
    if report.speed is not None:
        model.metadata_props[SPEED_KEY] = json.dumps(_speed_summary(report.speed), sort_keys=True)


def _speed_summary(speed: dict) -> dict:
    return {
        "provider": speed["provider"],
        "layers": [
            {
                "layer": table["layer"],
                "chosen": table["chosen"],
                # Why: a fixed choice (timed false, nothing measured) or what was measured.
                "timed": table.get("timed", True),
                "reason": table["reason"],
                "ms": {
                    label: {phase: round(ms, 3) for phase, ms in phases.items()}
                    for label, phases in table["ms"].items()
                },
            }
            for table in speed["layers"]
        ],
    }


def record_verification(path: str | os.PathLike[str], verification: dict) -> None:
    """Add the verdict to the model file at ``path`` (a staged output, before it is
    published): the verdict is known only after the verifier ran the written file. Only the
    graph's protobuf is rewritten; external data stays where it is, untouched."""
    model = onnx.load(os.fspath(path), load_external_data=False)
    summary = {
        "passed": verification.get("passed"),
        "rests_on": verification.get("rests_on", ""),
        "within_spread": [
            {
                "check": check["name"],
                "model": check["model"],
                "max_abs_diff": check["max_abs_diff"],
                "spread": check.get("spread"),
            }
            for check in verification.get("checks", [])
            if check.get("within_spread")
        ],
    }
    onnx.helper.set_model_props(
        model,
        {prop.key: prop.value for prop in model.metadata_props}
        | {VERIFICATION_KEY: json.dumps(summary, sort_keys=True)},
    )
    onnx.save(model, os.fspath(path))
