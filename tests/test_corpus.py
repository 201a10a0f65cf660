"""The CLI on the real exports of ../shared/corpus (made by mobius and by transformers'
exporter, not by our generator): what it rewrites, what it skips and why, and that the
verifier's verdict and the rewritten model's own consistency hold on ONNX Runtime CPU.

The corpus is read where it lies (its README says what each file contains and what the
original gets wrong); these tests are deselected in a clone without it (tests/conftest.py),
and .ci/run requires it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import CORPUS
from decoder_runs import chained_hf_logits

from rewriter import cli
from rewriter.rules._speed_choice import SPEED_FORM_KEY
from rewriter.speed import FOLD_ON_CPU, OWN_CACHE_FOLD_ON_CPU

pytestmark = pytest.mark.corpus


@dataclasses.dataclass(frozen=True)
class Export:
    path: str
    shared_layers: int  # KV-shared Attention nodes (no past inputs)
    own_cache_attention: int  # Attention nodes with past inputs (rewritten by --layers all)
    original_defects: tuple[str, ...]  # checks the original fails (corpus README)


MOBIUS = [
    Export(
        "mobius-a80d6ad/p1_mixed_cpu_f32.onnx",
        4,
        0,
        ("cache_consistency", "batch_consistency"),
    ),
    Export(
        "mobius-a80d6ad/p1_mixed_cuda_f16_d256_d512.onnx",
        4,
        1,
        ("cache_consistency", "batch_consistency"),
    ),
    Export("mobius-a80d6ad/p2_all_attention_default_f32.onnx", 4, 4, ("cache_consistency",)),
    # Third wave: fp16 biases built in float32 and cast (Unsqueeze(Cast(Where(...)))); the
    # original is consistent (corpus README), so no defect.
    Export("mobius-78437cd/main_default_f16.onnx", 6, 6, ()),
]


def _run(tmp_path: Path, source: Path, *options: str) -> tuple[int, dict, Path]:
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    code = cli.main([str(source), str(out), "--quiet", "--report", str(report_path), *options])
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    return code, report, out


def _attention_nodes(path: Path) -> list[ir.Node]:
    model = ir.load(path)
    return [node for node in model.graph if node.op_type == "Attention"]


def _check(report: dict, name: str, model: str) -> dict:
    (check,) = [
        c for c in report["verification"]["checks"] if c["name"] == name and c["model"] == model
    ]
    return check


@pytest.mark.parametrize("export", MOBIUS, ids=lambda e: Path(e.path).stem)
def test_mobius_exports_are_rewritten_whole_and_verified(tmp_path: Path, export: Export) -> None:
    source = CORPUS / export.path
    before = source.read_bytes()
    attention = _attention_nodes(source)
    shared = [n for n in attention if all(v is None for v in n.inputs[4:])]
    assert (len(shared), len(attention) - len(shared)) == (
        export.shared_layers,
        export.own_cache_attention,
    )

    # Every layer that qualifies to GQA (the speed choice is the next test's).
    code, report, out = _run(tmp_path, source, "--speed", "off")

    assert code == 0, report.get("verification", {}).get("failed_because")
    assert source.read_bytes() == before
    assert report["skipped"] == []
    assert report["rewritten"] == len(attention)
    rewritten = {r["node"]: r for r in report["rewrites"]}
    for node in shared:
        assert rewritten[node.name]["rule"].startswith("KVSharedAttentionToGQA/")
        assert rewritten[node.name]["form"] == "past"
    assert _attention_nodes(out) == []
    onnx.checker.check_model(onnx.load(out), full_check=True)

    verification = report["verification"]
    assert verification["passed"] is True and verification["failed_because"] == []
    # The rewritten model holds on its own: decode equals a longer prefill, and a
    # right-padded batch of 2 equals each row alone (prefill and a decode step).
    assert _check(report, "prefill_equivalence", "candidate")["passed"] is True
    assert _check(report, "cache_consistency", "candidate")["passed"] is True
    batch = _check(report, "batch_consistency", "candidate")
    assert batch["passed"] is True and "decode step" in batch["detail"]
    # The corpus README's defects of the original are found, and the rewrite fixes each.
    defects = {d["check"]: d["fixed_by_rewrite"] for d in verification["defects"]}
    assert defects == dict.fromkeys(export.original_defects, True)


@pytest.mark.parametrize("export", MOBIUS, ids=lambda e: Path(e.path).stem)
def test_mobius_exports_under_the_default_speed_choice(tmp_path: Path, export: Export) -> None:
    # The CLI's default (--speed auto): a layer is GQA, a faster form, or kept as exported,
    # by what was measured here; every rewritten layer is proven all the same.
    source = CORPUS / export.path
    attention = _attention_nodes(source)
    code, report, out = _run(tmp_path, source)
    assert code == 0, report.get("verification", {}).get("failed_because")
    assert report["rewritten"] + len(report["skipped"]) == len(attention)
    chosen = {
        (
            t["layer"]["dtype"],
            t["layer"]["head_size"],
            t["layer"]["local_window_size"],
            t["layer"]["own_cache"],
        ): t
        for t in report["speed"]["layers"]
    }
    for table in chosen.values():
        if table["timed"]:
            assert {"gqa", "export"} <= set(table["ms"]) and table["chosen"] in table["ms"]
        elif table["layer"]["own_cache"] and table["layer"]["export_correct"]:
            # The fixed CPU choice for float32 layers with their own cache: the fold over
            # Concat(past, new) in decode, GQA's native form in prefill
            # (rewriter.speed.fixed_choice).
            fixed = OWN_CACHE_FOLD_ON_CPU
            assert table["layer"]["dtype"] == "float32" and table["ms"] == {}
            assert (table["chosen"], table["reason"]) == (fixed.label, fixed.reason)
        elif table["chosen"] == FOLD_ON_CPU.label:
            # The fixed CPU choice for float32 KV-shared layers (rewriter.speed.fixed_choice).
            assert table["reason"] == FOLD_ON_CPU.reason and table["ms"] == {}
            assert table["layer"]["dtype"] == "float32" and not table["layer"]["own_cache"]
        else:  # a defective export that the fold does not serve: GQA, never timed
            assert table["chosen"] == "gqa" and not table["layer"]["export_correct"]
    for record in report["rewrites"]:
        own = record["rule"].startswith("NonShared")
        key = (record["dtype"], record["head_size"], record["local_window_size"], own)
        if record["speed_reason"].startswith("not timed: "):
            assert "correctness fix" in record["speed_reason"]
            assert record["speed_form"] == "gqa"
            assert key not in chosen or not chosen[key]["timed"]
        else:
            assert record["speed_form"] == chosen[key]["chosen"]
    for skip in report["skipped"]:
        assert skip["reason"].startswith("kept as exported, faster over one prefill")
    if export.original_defects == ("cache_consistency", "batch_consistency"):
        # P1: both defects are fixed by GQA and the fold alike, so no layer is timed or kept.
        assert report["skipped"] == [] and not any(t["timed"] for t in chosen.values())
    verification = report["verification"]
    assert verification["passed"] is True
    assert all(layer["passed"] and not layer.get("reason") for layer in verification["layers"])
    # As strict a check as the original passes: a kept own-cache layer of the all-Attention
    # export fails ONNX's full check there too (its Attention's present types are not inferred).
    onnx.checker.check_model(onnx.load(out), full_check=_passes_full_check(source))


def _passes_full_check(path: Path) -> bool:
    try:
        onnx.checker.check_model(onnx.load(path), full_check=True)
    except onnx.checker.ValidationError:
        return False
    except onnx.shape_inference.InferenceError:
        return False
    return True


def test_p1_mixed_head_size_comes_from_the_source_layer_not_its_present(tmp_path: Path) -> None:
    # The source GQA layers' present outputs say [batch, 1, _d22, _d21]: the head size is
    # static only on their past inputs, in the projections and after shape inference.
    source = CORPUS / "mobius-a80d6ad/p1_mixed_cpu_f32.onnx"
    code, report, _ = _run(tmp_path, source, "--layers", "shared", "--no-verify")
    assert code == 0
    assert {(r["head_size"], r["local_window_size"]) for r in report["rewrites"]} == {
        (32, 8),
        (64, None),
    }


@pytest.mark.parametrize("graph", ["prefill", "decode"])
def test_hf_exporter_graphs_are_rewritten_whole_and_verified(tmp_path: Path, graph: str) -> None:
    # Issue 14: rules/hf_attention.py matches the 4-D repeat_kv pattern.
    source = CORPUS / "hf-exporter-opset23" / f"{graph}.onnx"
    code, report, out = _run(tmp_path, source)
    assert code == 0, report.get("verification", {}).get("failed_because")
    assert report["rewritten"] == 8
    assert report["skipped"] == []
    assert all(r["rule"].startswith("HFAttentionToGQA") for r in report["rewrites"])
    assert report["padding_contract"] == "batch-1-only"
    assert _attention_nodes(out) == []
    verification = report["verification"]
    assert verification["passed"] is True
    assert _check(report, "prefill_equivalence", "candidate")["passed"] is True
    if graph == "decode":  # the decode graph alone takes past inputs
        assert _check(report, "cache_consistency", "original")["passed"] is True
        assert _check(report, "decode_equivalence", "candidate")["passed"] is True


def test_hf_prefill_and_decode_graphs_verify_as_a_pair(tmp_path: Path) -> None:
    graphs = CORPUS / "hf-exporter-opset23"
    rewritten = {}
    for graph in ("prefill", "decode"):
        out = tmp_path / f"{graph}.onnx"
        assert cli.main([str(graphs / f"{graph}.onnx"), str(out), "--quiet"]) == 0
        rewritten[graph] = out
    report_path = tmp_path / "pair.json"
    argv = ["verify", str(graphs / "prefill.onnx"), str(rewritten["prefill"]), "--quiet"]
    argv += ["--decode", str(graphs / "decode.onnx"), str(rewritten["decode"])]
    assert cli.main([*argv, "--report", str(report_path)]) == 0
    checks = json.loads(report_path.read_text())["verification"]["checks"]
    assert [(c["name"], c["model"], c["passed"]) for c in checks] == [
        ("prefill_equivalence", "both", True),
        ("cache_consistency", "original", True),
        ("cache_consistency", "candidate", True),
        ("decode_equivalence", "both", True),
    ]


def test_the_all_attention_export_with_its_own_cache_layers_kept_verifies() -> None:
    # What the speed choice does where GQA is slower for layers with their own cache (CPU,
    # measured): they stay as exported, the KV-shared ones become GQA, and it all verifies.
    from rewriter import rewrite, verify
    from rewriter.rules import SpeedChoice

    source = CORPUS / "mobius-a80d6ad/p2_all_attention_default_f32.onnx"

    def keep_own_cache(kind) -> SpeedChoice:
        # The KV-shared layers here are is_causal=1: asked as such, and never kept.
        assert kind.own_cache or not kind.export_correct
        return SpeedChoice("export", "export", "kept as exported, faster: test")

    model, report = rewrite(ir.load(source), choose_speed=keep_own_cache)
    assert report.rewritten == 4
    assert [skip.reason for skip in report.skipped] == ["kept as exported, faster: test"] * 4
    result = verify(source, model)
    assert result.passed, result.summary()
    assert len(result.layers) == 4 and all(layer.passed for layer in result.layers)


def test_single_token_decode_graph_verifies_by_default(tmp_path: Path) -> None:
    # transformers 5.25's export_for_generation default: decode declares input_ids and
    # position_ids [1, 1]. The verifier feeds calls of one token, chained through the cache,
    # and reports no defect for what the graph declares it does not take.
    source = CORPUS / "hf-exporter-5.25-opset24" / "decode.onnx"
    code, report, out = _run(tmp_path, source)
    assert code == 0, report.get("verification", {}).get("failed_because")
    assert report["rewritten"] == 12 and report["skipped"] == []
    assert _attention_nodes(out) == []
    verification = report["verification"]
    assert verification["passed"] is True and verification["defects"] == []
    prefill = _check(report, "prefill_equivalence", "candidate")
    assert prefill["passed"] is True and "declared S=1" in prefill["detail"]
    for role in ("original", "candidate"):
        assert _check(report, "cache_consistency", role).get("skipped") is True


BATCH2 = CORPUS / "hf-exporter-5.25-opset24-batch2"


def test_batch2_multi_token_decode_keeps_batched_chunks(tmp_path: Path) -> None:
    # Dynamic batch, several tokens per decode call: GQA refuses B > 1 with S > 1 after a
    # past unless given query_seqlens (own caches) or the split form (shared layers).
    code, report, out = _run(tmp_path, BATCH2 / "decode.onnx")
    assert code == 0, report.get("verification", {}).get("failed_because")
    assert report["rewritten"] == 12 and report["skipped"] == []
    chunks = [r["batched_chunks"] for r in report["rewrites"]]
    assert chunks.count("query_seqlens") == 6
    assert chunks.count("if(B==1 or S==1 or S==T: past, else: split with query_seqlens)") == 6
    assert not any("the only ones this export accepts" in w for w in report["warnings"])
    assert any("run as in the original" in w for w in report["warnings"])
    for role in ("original", "candidate"):
        batch = _check(report, "batch_consistency", role)
        assert batch["passed"] is True and "chunk of 3 tokens at batch 2" in batch["detail"]
    assert report["verification"]["passed"] is True
    # Every rewritten layer is accounted for, the If replacements included.
    assert len(report["verification"]["layers"]) == 12
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_batch2_verifier_refuses_a_rewrite_that_drops_batched_chunks(
    tmp_path: Path, monkeypatch
) -> None:
    # What the rewrite did before: the past form everywhere. ORT refuses the batch-2 chunk
    # the original runs, and the verifier must say so.
    from rewriter.rules import hf_attention

    monkeypatch.setattr(hf_attention, "_takes_batched_chunks", lambda *_: False)
    code, report, _ = _run(tmp_path, BATCH2 / "decode.onnx")
    assert code != 0
    assert _check(report, "batch_consistency", "original")["passed"] is True
    candidate = _check(report, "batch_consistency", "candidate")
    assert candidate["passed"] is False and "batch_size must be 1" in candidate["detail"]
    assert any("batch_consistency" in why for why in report["verification"]["failed_because"])


def test_batch2_chunk_after_a_prefill_matches_the_original(tmp_path: Path) -> None:
    # The corpus README's case: B=2, a 5-token prefill (prefill graph), then 3 new tokens
    # (decode graph), then more chunks past the window (16), chained through each pair's
    # own presents.
    from rewriter.verification._tolerance import compare

    pairs = {"original": (BATCH2 / "prefill.onnx", BATCH2 / "decode.onnx")}
    for graph in ("prefill", "decode"):
        out = tmp_path / f"{graph}.onnx"
        assert cli.main([str(BATCH2 / f"{graph}.onnx"), str(out), "--quiet", "--no-verify"]) == 0
    pairs["rewritten"] = (tmp_path / "prefill.onnx", tmp_path / "decode.onnx")
    tokens = np.random.default_rng(0).integers(0, 256, (2, 32))
    lengths = (5, 3, 1, 4, 3, 3, 3, 3)
    logits = {
        label: chained_hf_logits(paths, tokens, lengths, 16) for label, paths in pairs.items()
    }
    assert sum(lengths) == 25  # past the window of 16
    for step, (reference, actual) in enumerate(
        zip(logits["original"], logits["rewritten"], strict=True)
    ):
        assert reference.shape[0] == 2
        case = compare(f"call {step}", reference, actual)
        assert case.passed, case


def test_drafter_layers_are_folded_and_verified(tmp_path: Path) -> None:
    # Every layer becomes the fold at any S, no If: the full layer (no mask, is_causal=0)
    # without a mask, the sliding layers with the export's own bias (it starts from a Slice of
    # attention_mask to the borrowed cache's length, which no P1/P2 pattern matches). The
    # verifier drives the drafter's own inputs and proves every layer.
    source = CORPUS / "mobius-78437cd" / "assistant_drafter_f32.onnx"
    code, report, out = _run(tmp_path, source)
    assert code == 0 and report["rewritten"] == 4 and not report["skipped"]
    styles = {r["node"]: (r["speed_form"], r["mask_style"]) for r in report["rewrites"]}
    assert styles["model/layers.3/self_attn/Attention_node_158"] == ("fold", "none")
    assert sorted(styles.values()) == [("fold", "export")] * 3 + [("fold", "none")]
    assert report["padding_contract"] == "unchanged" and not report["warnings"]
    verification = report["verification"]
    assert verification["passed"] is True, verification["failed_because"]
    assert len(verification["layers"]) == 4
    assert all(layer["passed"] for layer in verification["layers"])
    assert _check(report, "prefill_equivalence", "candidate")["passed"] is True
    # The original's full layer reads a padded row's padding keys: named, and kept.
    (defect,) = verification["defects"]
    assert defect["check"] == "batch_consistency"
    assert "no mask and is_causal=0" in defect["description"]
    model = ir.load(out)
    assert not [n for n in model.graph if n.op_type in ("If", "GroupQueryAttention")]
    # One fold per layer; in float32 its product is FusedMatMul, Softmax and MatMul
    # (rules._speed_choice.fold_product), so no Attention is left.
    assert not _attention_nodes(out)
    products = [
        n
        for n in model.graph
        if n.op_type == "FusedMatMul" and n.metadata_props.get(SPEED_FORM_KEY) == "fold"
    ]
    assert len(products) == 4


@pytest.mark.parametrize(("batch", "length", "total"), [(1, 1, 20), (2, 1, 20), (2, 3, 20)])
def test_the_rewritten_drafter_runs_the_calls_the_original_runs(
    tmp_path: Path, batch: int, length: int, total: int
) -> None:
    # B=2 with S=3 after 17 keys of the target's cache (past the window of 16): what
    # GroupQueryAttention refuses; the folds run it and match the original.
    from rewriter.verification._tolerance import compare

    source = CORPUS / "mobius-78437cd" / "assistant_drafter_f32.onnx"
    code, _, out = _run(tmp_path, source)
    assert code == 0
    rng = np.random.default_rng(3)
    feeds = {
        "inputs_embeds": rng.standard_normal((batch, length, 256)).astype(np.float32),
        "position_ids": np.tile(np.arange(total - length, total), (batch, 1)),
        "attention_mask": np.ones((batch, total), dtype=np.int64),
    }
    for kind, dim in (("sliding", 32), ("full", 64)):
        for part in ("key", "value"):
            shape = (batch, 2, total, dim)
            feeds[f"shared_kv.{kind}_attention.{part}"] = rng.standard_normal(shape).astype(
                np.float32
            )
    outputs = {}
    for label, path in (("original", source), ("rewritten", out)):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs[label] = session.run(["logits", "projected_state"], feeds)
    for name, reference, actual in zip(
        ("logits", "projected_state"), outputs["original"], outputs["rewritten"], strict=True
    ):
        case = compare(name, reference, actual)
        assert case.passed, case
