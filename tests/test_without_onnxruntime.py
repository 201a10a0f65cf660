"""The rules and the pass need onnxscript and onnx-ir only: onnxruntime is an extra, and
the rules read a plain table of decisions."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "p2_tiny.onnx"

# A None entry in sys.modules makes `import onnxruntime` raise ImportError, as on a
# machine without it.
_PROGRAM = textwrap.dedent(
    f"""
    import sys
    sys.modules["onnxruntime"] = None
    import onnx_ir as ir
    import rewriter.rules
    from rewriter import fuse_attention_to_gqa
    from rewriter.rules import always_past

    from rewriter.rules import FormDecision, FormQuestion, LayerDecisions, gqa_rules
    from rewriter.rules._shape_evidence import ShapeFacts

    model = ir.load({str(FIXTURE)!r})
    print(fuse_attention_to_gqa(model, choose_form=always_past))
    # The rules alone, reading a plain table of decisions.
    model = ir.load({str(FIXTURE)!r})
    table = LayerDecisions(
        forms={{
            FormQuestion("float32", 8, True): FormDecision("past"),
            FormQuestion("float32", 16, False): FormDecision("past"),
        }}
    )
    rules = gqa_rules(table, facts=ShapeFacts.infer(model))
    rules.rule_set.apply_to_model(model)
    print(len(rules.log.rewrites))
    try:
        fuse_attention_to_gqa(ir.load({str(FIXTURE)!r}))
    except ImportError as error:
        print("probe needs onnxruntime:", error)
    """
)


def test_rules_and_pass_run_without_onnxruntime() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROGRAM], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "3"
    assert lines[1] == "3"
    # Without a chooser the form probe is asked for, and it is the one part that needs ORT.
    assert lines[2].startswith("probe needs onnxruntime:")
