"""Speed-aware choice (rewriter.speed, rules._speed_choice): a KV-shared layer whose export is
correct runs, per phase, the form measured fastest; a defective export always becomes GQA."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest
from onnxscript.rewriter import pattern

from rewriter import cli, rewrite
from rewriter import speed as rewriter_speed
from rewriter.metadata import SPEED_KEY
from rewriter.rules import (
    DEFECTIVE_EXPORT_REASON,
    KVSharedAttentionToGQA,
    LayerKind,
    RewriteLog,
    RuleLog,
    SpeedChoice,
    always_past,
)
from rewriter.speed import FOLD_ON_CPU, SpeedProbe
from rewriter.verification import verify

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _apply(choose_speed, name: str) -> RuleLog:
    """The KV-shared rule alone on a fixture; what it logged."""
    log = RewriteLog()
    rule = KVSharedAttentionToGQA.rule(choose_speed=choose_speed, log=log)
    pattern.RewriteRuleSet([rule]).apply_to_model(ir.load(FIXTURES / f"{name}.onnx"))
    return log.rule(KVSharedAttentionToGQA.__name__)


def test_a_correct_export_is_kept_where_the_keeper_says_so() -> None:
    asked: list[LayerKind] = []

    def keep(kind: LayerKind) -> SpeedChoice:
        asked.append(kind)
        return SpeedChoice("export", "export", "kept as exported, faster: test")

    logged = _apply(keep, "p2_tiny")
    assert logged.rewrites == []
    assert {skip.reason for skip in logged.skips.values()} == {"kept as exported, faster: test"}
    # What the layer's speed depends on, read off the layer (sliding D=8 W=4, full D=16).
    assert {(k.head_size, k.local_window_size, k.num_heads, k.kv_num_heads) for k in asked} == {
        (8, 4, 4, 1),
        (16, None, 4, 1),
    }


@pytest.mark.parametrize("name", ["p1_tiny", "p2_causal_tiny"])
@pytest.mark.parametrize(
    "kept", [("export", "export"), ("export", "gqa"), ("attention-bnsh", "gqa")]
)
def test_a_defective_export_is_rewritten_whatever_the_timing(
    name: str, kept: tuple[str, str]
) -> None:
    # is_causal=1 without past is wrong in decode: keeping it in any phase would keep the bug.
    asked: list[LayerKind] = []

    def keep(kind: LayerKind) -> SpeedChoice:
        asked.append(kind)
        return SpeedChoice(*kept, "measured faster: test")

    logged = _apply(keep, name)
    assert len(logged.rewrites) == 3 and not logged.skips
    assert asked and not any(kind.export_correct for kind in asked)
    assert {r.speed_form for r in logged.rewrites} == {"gqa"}
    assert {r.speed_reason for r in logged.rewrites} == {DEFECTIVE_EXPORT_REASON}
    # Never timed: the probe's answer for such a layer is fixed.
    for kind in asked:
        cuda = SpeedProbe("cuda").verdict(kind)
        assert not cuda.timed and cuda.choice.label == "gqa"


@pytest.mark.parametrize("name", ["p1_tiny", "p2_causal_tiny", "p2_tiny"])
def test_the_fold_replaces_a_defective_export_too(name: str) -> None:
    # The fold reads nothing of the export (its mask comes from GQA's lengths).
    logged = _apply(lambda _: SpeedChoice("fold", "gqa", "test"), name)
    assert len(logged.rewrites) == 3
    assert {r.speed_form for r in logged.rewrites} == {"if(S==1: fold, else: gqa)"}


# Every form a speed choice can write, as a fixed choice: (decode form, prefill form).
CHOICES = [
    ("attention-bnsh", "attention-bnsh"),
    ("attention-bnsh", "gqa"),
    ("gqa", "attention-bnsh"),
    ("export", "gqa"),
    ("gqa", "export"),
    ("fold", "gqa"),
]


@pytest.mark.parametrize(("decode", "prefill"), CHOICES)
def test_each_speed_form_computes_what_the_export_does(decode: str, prefill: str) -> None:
    # ONNX Runtime decides: prefill, decode and padded batches against the original.
    choice = SpeedChoice(decode, prefill, "test")
    original = ir.load(FIXTURES / "p2_tiny.onnx")
    model, report = rewrite(
        ir.load(FIXTURES / "p2_tiny.onnx"), choose_form=always_past, choose_speed=lambda _: choice
    )
    assert [r.speed_form for r in report.rewrites] == [choice.label] * 3
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    result = verify(original, model)
    assert result.passed, result.summary()
    ran = {check.name for check in result.checks if check.passed is True}
    assert {"prefill_equivalence", "decode_equivalence", "batch_consistency"} <= ran
    # Nothing but the layers changed, even where they have no layer proof.
    assert result.graph_diff is not None and result.graph_diff.passed is True


@pytest.mark.parametrize(("decode", "prefill"), [("gqa", "gqa"), *CHOICES])
def test_what_a_layer_runs_is_named_after_the_layer(decode: str, prefill: str) -> None:
    # A profile or runtime error names nodes: it must say which layer (not node_Attention_3).
    original = ir.load(FIXTURES / "p2_tiny.onnx")
    replaced = [n.name for n in original.graph if n.op_type == "Attention"]
    kept = {n.name for n in original.graph}  # the model's own GQA layers among them
    choice = SpeedChoice(decode, prefill, "test")
    model, report = rewrite(original, choose_form=always_past, choose_speed=lambda _: choice)
    assert report.rewritten == len(replaced) == 3
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    runs = [
        n
        for n in nodes
        if n.op_type in ("Attention", "GroupQueryAttention", "If") and n.name not in kept
    ]
    layers = {next(layer for layer in replaced if n.name.startswith(f"{layer}/")) for n in runs}
    assert layers == set(replaced)
    names = [n.name for n in nodes]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize(("decode", "prefill"), [("attention-bnsh", "gqa"), ("export", "gqa")])
def test_an_if_on_the_query_length_runs_the_decode_form_for_one_token(
    decode: str, prefill: str
) -> None:
    choice = SpeedChoice(decode, prefill, "test")
    model, _ = rewrite(
        ir.load(FIXTURES / "p2_tiny.onnx"), choose_form=always_past, choose_speed=lambda _: choice
    )
    ifs = [node for node in model.graph if node.op_type == "If"]
    assert len(ifs) == 3
    for node in ifs:
        then_ops = [n.op_type for n in node.attributes["then_branch"].as_graph()]
        else_ops = [n.op_type for n in node.attributes["else_branch"].as_graph()]
        assert "Attention" in then_ops and "GroupQueryAttention" not in then_ops
        assert else_ops == ["GroupQueryAttention"]
        condition = node.inputs[0].producer()
        assert condition is not None and condition.op_type == "Equal"
    assert not any(n.op_type == "Attention" for n in model.graph)


@pytest.mark.parametrize(("decode", "prefill"), CHOICES)
def test_a_second_run_leaves_what_a_speed_choice_wrote(decode: str, prefill: str) -> None:
    choice = SpeedChoice(decode, prefill, "test")
    model, _ = rewrite(
        ir.load(FIXTURES / "p2_tiny.onnx"), choose_form=always_past, choose_speed=lambda _: choice
    )
    before = ir.to_proto(model).SerializeToString()
    again, report = rewrite(model, choose_form=always_past)
    assert report.rewritten == 0
    assert all(skip.reason.startswith("written by a speed choice") for skip in report.skipped)
    assert ir.to_proto(again).SerializeToString() == before


def test_the_fold_is_a_decode_form_only() -> None:
    with pytest.raises(ValueError, match="decode form"):
        SpeedChoice("fold", "fold")
    with pytest.raises(ValueError, match="decode form"):
        SpeedChoice("gqa", "fold")
    with pytest.raises(ValueError, match="behind GQA's or the export's prefill"):
        SpeedChoice("fold", "attention-bnsh")
    # The two prefills a fold may decode behind: GQA's (a KV-shared layer) and the export's
    # own node (a layer with its own cache, rules._speed_choice.own_cache_fold).
    assert SpeedChoice("fold", "gqa").label == "if(S==1: fold, else: gqa)"
    assert SpeedChoice("fold", "export").label == "if(S==1: fold, else: export)"


def test_cpu_float32_kv_shared_layers_get_the_fold_without_timing() -> None:
    # Measured once (bench/results/results_1.32_fold.json), fixed in code: no per-run timing.
    probe = SpeedProbe()
    for window, export_correct in ((512, True), (None, True), (512, False)):
        layer = LayerKind(
            "float32", 8, 1, 256, window, scale=1.0, softcap=0.0, export_correct=export_correct
        )
        verdict = probe.verdict(layer)
        assert verdict.choice == FOLD_ON_CPU and not verdict.timed and verdict.ms == {}
        assert probe.tables()[-1]["timed"] is False
    # CUDA keeps what it measures (nothing fixed there).
    shared = LayerKind("float32", 8, 1, 256, 512, scale=1.0, softcap=0.0)
    assert rewriter_speed.fixed_choice(shared, "cuda") is None


def test_cpu_float32_layers_with_their_own_cache_get_a_fixed_choice() -> None:
    """Measured on a whole real export (rewriter.speed): every own-cache layer folds in
    decode over Concat(past, new) and keeps the export's node in prefill."""
    sliding = LayerKind("float32", 8, 1, 256, 512, scale=1.0, softcap=0.0, own_cache=True)
    full = LayerKind("float32", 8, 1, 512, None, scale=1.0, softcap=0.0, own_cache=True)
    assert rewriter_speed.fixed_choice(sliding, "cpu") == rewriter_speed.OWN_CACHE_FOLD_ON_CPU
    assert rewriter_speed.fixed_choice(full, "cpu") == rewriter_speed.OWN_CACHE_FOLD_ON_CPU
    verdict = SpeedProbe().verdict(full)
    assert verdict.choice.label == "if(S==1: fold, else: gqa)"
    assert not verdict.timed and verdict.ms == {}
    # Timed where nothing was measured: another provider or dtype; a defective export is
    # never kept.
    assert rewriter_speed.fixed_choice(sliding, "cuda") is None
    fp16 = LayerKind("float16", 8, 1, 256, 512, scale=1.0, softcap=0.0, own_cache=True)
    assert rewriter_speed.fixed_choice(fp16, "cpu") is None
    wrong = LayerKind(
        "float32", 8, 1, 512, None, scale=1.0, softcap=0.0, own_cache=True, export_correct=False
    )
    assert rewriter_speed.fixed_choice(wrong, "cpu").label == "gqa"


def test_probe_decides_by_the_generation_it_measured() -> None:
    probe = SpeedProbe(
        decode_length=256, prefill_length=64, decode_steps=32, repeats=(5, 2), fixed=False
    )
    layer = LayerKind("float32", 4, 1, 16, None, scale=1.0, softcap=0.0)
    choice = probe(layer)
    verdict = probe.verdict(layer)
    assert probe.verdict(layer) is verdict and verdict.choice is choice  # measured once
    assert {"gqa", "attention-bnsh", "export"} <= set(verdict.ms)
    for timings in verdict.ms.values():
        assert set(timings) == {"decode", "prefill"} and min(timings.values()) > 0
    # Per phase GQA, or a form faster than GQA by the margin; an If is measured only when
    # the phases' winners differ.
    winners = verdict.phase_winners
    for phase, winner in winners.items():
        assert winner == "gqa" or verdict.ms[winner][phase] * 1.1 < verdict.ms["gqa"][phase]
    phase_ifs = [label for label in verdict.ms if label.startswith("if(")]
    if winners["decode"] != winners["prefill"]:
        assert phase_ifs == [SpeedChoice(winners["decode"], winners["prefill"]).label]
    else:
        assert phase_ifs == []
    cost = {label: ms["prefill"] + 32 * ms["decode"] for label, ms in verdict.ms.items()}
    assert verdict.generation_ms == cost
    if winners["decode"] == winners["prefill"]:
        expected = winners["decode"]
    else:  # weighed over a generation among GQA, the two winners and their If
        pool = {label: cost[label] for label in ("gqa", *winners.values(), *phase_ifs)}
        cheapest = min(pool, key=pool.__getitem__)
        expected = "gqa" if pool["gqa"] <= 1.1 * pool[cheapest] else cheapest
    assert choice.label == expected
    assert choice.reason.startswith("kept as exported" if expected == "export" else expected)
    assert probe.tables()[0]["layer"]["head_size"] == 16
    assert probe.tables()[0]["chosen"] == expected


def test_cli_reports_the_timings_its_choices_rest_on(tmp_path: Path) -> None:
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    argv = [str(FIXTURES / "p2_tiny.onnx"), str(out), "--quiet", "--report", str(report_path)]
    assert cli.main([*argv, "--speed", "auto"]) == 0
    report = json.loads(report_path.read_text())
    verdicts = {
        (entry["layer"]["head_size"], entry["layer"]["local_window_size"]): entry
        for entry in report["speed"]["layers"]
    }
    assert set(verdicts) == {(8, 4), (16, None)}
    kept = {skip["reason"] for skip in report["skipped"]}
    for entry in verdicts.values():
        # float32 KV-shared layers on CPU: the fixed choice, nothing timed.
        assert entry["timed"] is False and entry["ms"] == {}
        assert entry["chosen"] == FOLD_ON_CPU.label and entry["reason"] == FOLD_ON_CPU.reason
        assert entry["reason"] not in kept
    forms = {r["speed_form"] for r in report["rewrites"]}
    assert forms <= {entry["chosen"] for entry in verdicts.values()}
    assert report["rewritten"] + len(report["skipped"]) == 3
    assert report["verification"]["passed"] is True
    # The model file keeps what the choice rested on.
    metadata = {p.key: p.value for p in onnx.load(out).metadata_props}
    recorded = json.loads(metadata[SPEED_KEY])
    assert sorted(e["chosen"] for e in recorded["layers"]) == sorted(
        e["chosen"] for e in verdicts.values()
    )


def test_the_library_pass_times_nothing_by_default_the_cli_does(tmp_path: Path) -> None:
    _, report = rewrite(ir.load(FIXTURES / "p2_tiny.onnx"))
    assert report.speed is None and report.rewritten == 3
    assert {r.speed_form for r in report.rewrites} == {"gqa"}
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    argv = [str(FIXTURES / "p2_tiny.onnx"), str(out), "--quiet", "--no-verify"]
    assert cli.main([*argv, "--report", str(report_path), "--speed", "off"]) == 0
    assert json.loads(report_path.read_text())["speed"] is None
    assert cli.main([*argv, "--report", str(report_path)]) == 0
    assert len(json.loads(report_path.read_text())["speed"]["layers"]) == 2


def test_a_layer_with_its_own_cache_is_kept_where_gqa_is_slower() -> None:
    # --layers all converts such a layer only where GQA is not measured slower (issue 13).
    asked: list[LayerKind] = []

    def choose(kind: LayerKind) -> SpeedChoice:
        asked.append(kind)
        form = "export" if kind.own_cache else "gqa"
        return SpeedChoice(form, form, f"{form}: test")

    _, report = rewrite(
        ir.load(FIXTURES / "p2_all_attention_tiny.onnx"),
        choose_form=always_past,
        choose_speed=choose,
    )
    own = [kind for kind in asked if kind.own_cache]
    assert own and all(kind.kv_num_heads > 0 for kind in own)
    # Each kind of layer is decided once, before the rules run.
    assert len(asked) == len(set(asked))
    assert report.rewrites and all(r.rule.startswith("KVShared") for r in report.rewrites)
    kept = [skip for skip in report.skipped if skip.reason == "export: test"]
    # The fixture's four own-cache layers, of two kinds (sliding and full).
    assert len(own) == 2
    assert len(kept) == 4


@pytest.mark.parametrize("name", ["p1_tiny", "p1_attention_full_tiny"])
def test_a_correctness_fix_is_the_stated_reason_not_a_timing(name: str) -> None:
    def choose(kind: LayerKind) -> SpeedChoice:
        assert not kind.export_correct  # every KV-shared layer of these exports is P1
        return SpeedChoice("export", "export", "kept as exported, faster: test")

    _, report = rewrite(
        ir.load(FIXTURES / f"{name}.onnx"), choose_form=always_past, choose_speed=choose
    )
    assert report.rewrites and not report.skipped
    for record in report.rewrites:
        assert record.speed_form == "gqa"
        assert (
            record.speed_reason.startswith("not timed: ")
            and "correctness fix" in record.speed_reason
        )


@pytest.mark.parametrize(("decode", "prefill"), CHOICES)
def test_each_speed_form_is_proven_layer_by_layer(decode: str, prefill: str) -> None:
    choice = SpeedChoice(decode, prefill, "test")
    model, _ = rewrite(
        ir.load(FIXTURES / "p2_tiny.onnx"), choose_form=always_past, choose_speed=lambda _: choice
    )
    result = verify(ir.load(FIXTURES / "p2_tiny.onnx"), model, mode="layers")
    assert result.passed, result.summary()
    assert len(result.layers) == 3
    for layer in result.layers:
        assert not layer.reason and layer.checks
        assert all(check.passed for check in layer.checks if check.model == "candidate")


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_a_wrong_branch_of_the_if_fails_its_layer_proof(phase: str) -> None:
    # Both branches are run by the proof: a scale doubled in either one is caught there.
    choice = SpeedChoice("attention-bnsh", "gqa", "test")
    model, _ = rewrite(
        ir.load(FIXTURES / "p2_tiny.onnx"), choose_form=always_past, choose_speed=lambda _: choice
    )
    first_if = next(node for node in model.graph if node.op_type == "If")
    branch = first_if.attributes["then_branch" if phase == "decode" else "else_branch"].as_graph()
    attention = next(n for n in branch if n.op_type in ("Attention", "GroupQueryAttention"))
    scale = attention.attributes["scale"].as_float()
    attention.attributes["scale"] = ir.AttrFloat32("scale", 2 * scale)
    result = verify(ir.load(FIXTURES / "p2_tiny.onnx"), model, mode="layers")
    assert not result.passed
    failed = [layer.node for layer in result.layers if not layer.passed]
    assert failed and all(not layer.reason for layer in result.layers)
    assert len(failed) == 1
