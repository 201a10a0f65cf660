"""onnxruntime-genai packages: folder in, folder out, the config updated and proven by generating.

Tests marked ``genai`` run greedy generation with onnxruntime-genai (the ``genai`` extra);
.ci/run installs it and requires them (conftest). The generator-made package is the committed
all-Attention fixture's layout with a genai_config.json written like mobius's.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest
from conftest import CORPUS

from rewriter import package as package_module
from rewriter.cli import main
from rewriter.fixtures.gemma4_like import build_decoder, tiny_config
from rewriter.package import GENAI_OWN_CACHE, PackageSpeed, keeps_export_convention
from rewriter.rules import LayerKind
from rewriter.speed import OWN_CACHE_FOLD_ON_CPU, fixed_choice

CORPUS_PACKAGE = CORPUS / "mobius-78437cd-genai" / "default_f32"
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _genai_config(vocab: int, layers: int, heads: int, kv_heads: int, head_size: int) -> dict:
    """The fields mobius's export_package writes (see the corpus package's config)."""
    return {
        "model": {
            "type": "gemma4_text",
            "vocab_size": vocab,
            "context_length": 256,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": head_size,
                "hidden_size": heads * head_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": heads,
                "num_hidden_layers": layers,
                "num_key_value_heads": kv_heads,
            },
            "bos_token_id": 2,
            "eos_token_id": 1,
            "pad_token_id": 0,
        },
        "search": {
            "do_sample": False,
            "max_length": 256,
            "num_beams": 1,
            "past_present_share_buffer": False,
            "top_k": 1,
        },
    }


@pytest.fixture
def generated_package(tmp_path: Path) -> Path:
    config = tiny_config(mask_style="p2", nonshared_attention="attention")
    package = tmp_path / "package"
    package.mkdir()
    onnx.save(build_decoder(config), package / "model.onnx")
    genai_config = _genai_config(
        config.vocab_size,
        config.num_layers,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim_sliding,
    )
    (package / "genai_config.json").write_text(json.dumps(genai_config, indent=4))
    (package / "tokenizer.json").write_text('{"stand-in": "copied unchanged"}')
    return package


def _run(*argv: object) -> int:
    return main([str(a) for a in argv])


def _report(path: Path) -> dict:
    return json.loads(path.read_text())


def test_existing_output_is_refused(
    generated_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out"
    output.mkdir()
    assert _run(generated_package, output, "--no-verify") == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "exists" in error
    assert list(output.iterdir()) == []


def test_output_inside_the_package_is_refused(
    generated_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(p.name for p in generated_package.iterdir())
    assert _run(generated_package, generated_package / "rewritten", "--no-verify") == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "inside the input package" in error
    assert sorted(p.name for p in generated_package.iterdir()) == before


def test_without_a_genai_run_the_share_buffer_stays_off(
    generated_package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Turned on only by a run that proves it: not by --no-verify, not without genai."""
    monkeypatch.setattr(package_module, "genai_available", lambda: False)
    for flag, why in (("--no-verify", "--no-verify"), ("--speed=off", "not installed")):
        output, report = tmp_path / f"out{flag}", tmp_path / f"report{flag}.json"
        assert _run(generated_package, output, flag, "--quiet", "--report", report) == 0
        config = json.loads((output / "genai_config.json").read_text())
        assert config == json.loads((generated_package / "genai_config.json").read_text())
        package = _report(report)["package"]
        assert package["config_changes"] == []
        assert why in package["generation"]["skipped"]
        assert (output / "tokenizer.json").read_bytes() == (
            generated_package / "tokenizer.json"
        ).read_bytes()
        assert sorted(p.name for p in output.iterdir()) == sorted(
            p.name for p in generated_package.iterdir()
        )


@pytest.mark.genai
def test_generated_package_gets_the_shared_buffer(generated_package: Path, tmp_path: Path) -> None:
    output, report = tmp_path / "out", tmp_path / "report.json"
    assert _run(generated_package, output, "--speed", "off", "--quiet", "--report", report) == 0
    before = json.loads((generated_package / "genai_config.json").read_text())
    after = json.loads((output / "genai_config.json").read_text())
    before["search"]["past_present_share_buffer"] = True
    assert after == before
    package = _report(report)["package"]
    assert [c["key"] for c in package["config_changes"]] == ["search.past_present_share_buffer"]
    runs = package["generation"]["runs"]
    assert [run["batch"] for run in runs] == [1, 2]
    assert all(run["passed"] and run["past_present_share_buffer"] for run in runs)
    assert (output / "tokenizer.json").read_text() == (
        generated_package / "tokenizer.json"
    ).read_text()


@pytest.mark.genai
def test_an_attention_cache_keeps_the_share_buffer_off(
    generated_package: Path, tmp_path: Path
) -> None:
    """A layer kept as Attention (--layers shared leaves every layer with its own cache as
    exported; --exact-padding keeps their cache layout for the rewritten layers) cannot take
    genai's shared buffer: the config says false and names the layer; generation in that mode
    matches the original."""
    output, report = tmp_path / "out", tmp_path / "report.json"
    argv = ("--layers", "shared", "--exact-padding", "--quiet", "--report", report)
    assert _run(generated_package, output, *argv) == 0
    after = json.loads((output / "genai_config.json").read_text())
    assert after["search"]["past_present_share_buffer"] is False
    package = _report(report)["package"]
    assert package["config_changes"] == []
    assert "feeds Attention" in package["config_kept"][0]
    assert all(
        run["passed"] and not run["past_present_share_buffer"]
        for run in package["generation"]["runs"]
    )


@pytest.mark.genai
def test_a_generation_that_differs_writes_nothing(
    generated_package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The genai proof is a gate: a rewritten package whose tokens differ is not written."""
    real = package_module.generate

    def off_by_one_token(package: Path, **options: object):
        generations = real(package, **options)
        if package != generated_package:
            generations.sequences[1][0][-1] += 1
        return generations

    monkeypatch.setattr(package_module, "generate", off_by_one_token)
    output, report = tmp_path / "out", tmp_path / "report.json"
    assert _run(generated_package, output, "--speed", "off", "--quiet", "--report", report) == 1
    assert not output.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    package = _report(report)["package"]
    assert package["generation"]["passed"] is False
    assert "first differs" in package["generation"]["runs"][0]["note"]


@pytest.mark.genai
@pytest.mark.corpus
def test_corpus_package_gets_the_shared_buffer(tmp_path: Path) -> None:
    output, report = tmp_path / "out", tmp_path / "report.json"
    assert _run(CORPUS_PACKAGE, output, "--speed", "off", "--quiet", "--report", report) == 0
    after = json.loads((output / "genai_config.json").read_text())
    assert after["search"]["past_present_share_buffer"] is True
    data = _report(report)
    assert data["verification"]["passed"] is True
    runs = data["package"]["generation"]["runs"]
    assert [(run["batch"], run["tokens_equal"]) for run in runs] == [(1, True), (2, True)]
    assert all(run["worst_logits"]["passed"] for run in runs)


@pytest.mark.genai
@pytest.mark.corpus
def test_corpus_package_under_the_default_speed_choice(tmp_path: Path) -> None:
    """--speed auto on a package of a correct float32 export: every decode step keeps the
    export's cache convention (layers with their own cache fold over Concat(past, new),
    KV-shared layers fold over the export's bias), as genai's batched decode feeds it; the
    folds' Attention refuses the shared buffer: the config keeps false and says why;
    generation matches, batch 2 included."""
    output, report = tmp_path / "out", tmp_path / "report.json"
    assert _run(CORPUS_PACKAGE, output, "--quiet", "--report", report) == 0
    data = _report(report)
    own_cache = [r for r in data["rewrites"] if r["rule"].startswith("NonShared")]
    assert own_cache and all(r["speed_form"] == OWN_CACHE_FOLD_ON_CPU.label for r in own_cache)
    after = json.loads((output / "genai_config.json").read_text())
    assert after["search"]["past_present_share_buffer"] is False
    # The first blocker: a cache input read by the own-cache fold's Concat, not by GQA.
    assert (
        "only GroupQueryAttention takes genai's shared buffer" in data["package"]["config_kept"][0]
    )
    runs = data["package"]["generation"]["runs"]
    assert [(run["batch"], run["passed"]) for run in runs] == [(1, True), (2, True)]


@pytest.mark.genai
def test_mixed_cache_conventions_are_refused(generated_package: Path, tmp_path: Path) -> None:
    """--layers shared --speed off leaves the layers with their own cache as Attention (new
    token after the padding) beside GroupQueryAttention layers (right after the valid
    tokens): genai's batched decode feeds both one mask and the tokens differ, as the
    rewrite's right-padding warning says. Nothing is written, and the hint says what to run
    instead."""
    output, report = tmp_path / "out", tmp_path / "report.json"
    argv = ["--layers", "shared", "--speed", "off", "--quiet", "--report", report]
    assert _run(generated_package, output, *argv) == 1
    assert not output.exists()
    generation = _report(report)["package"]["generation"]
    assert generation["passed"] is False
    assert [run["batch"] for run in generation["runs"] if not run["tokens_equal"]] == [2]
    assert "--layers all" in generation["hint"]


@pytest.mark.genai
def test_kv_shared_folds_over_the_export_bias_decode_beside_attention_caches(
    generated_package: Path, tmp_path: Path
) -> None:
    """--layers shared under the default speed choice: the layers with their own cache stay
    Attention, and the KV-shared layers' decode fold reads the export's own bias, so every
    layer takes genai's batched decode mask (the new token after the padding) as the original
    does: the package is written and batch 2 generates the original's tokens."""
    output, report = tmp_path / "out", tmp_path / "report.json"
    assert _run(generated_package, output, "--layers", "shared", "--quiet", "--report", report) == 0
    runs = _report(report)["package"]["generation"]["runs"]
    assert [(run["batch"], run["tokens_equal"], run["passed"]) for run in runs] == [
        (1, True, True),
        (2, True, True),
    ]


def test_own_cache_layers_of_a_package_keep_the_export_convention_only_where_all_can() -> None:
    """PackageSpeed: the fold (append after the padding) for layers with their own cache only
    when every decode step keeps that convention (keeps_export_convention); otherwise GQA, so
    that no GroupQueryAttention-convention layer reads genai's mask beside them."""
    own = LayerKind("float32", 8, 1, 256, 512, scale=1.0, softcap=0.0, own_cache=True)
    fixed = lambda layer: fixed_choice(layer, "cpu")  # noqa: E731
    assert PackageSpeed(fixed, export_convention=True)(own) == OWN_CACHE_FOLD_ON_CPU
    assert PackageSpeed(fixed, export_convention=False)(own) == GENAI_OWN_CACHE
    assert keeps_export_convention(ir.load(FIXTURES / "p2_all_attention_tiny.onnx"), "cpu")
    assert not keeps_export_convention(ir.load(FIXTURES / "p2_all_attention_tiny.onnx"), "cuda")
    # P1: is_causal=1 without past, the fold builds GQA's mask.
    assert not keeps_export_convention(ir.load(FIXTURES / "p1_attention_full_tiny.onnx"), "cpu")
    # A boolean mask (P1's) on a layer with its own cache: that layer becomes GQA.
    model = ir.load(FIXTURES / "p2_all_attention_tiny.onnx")
    own = next(n for n in model.graph if n.op_type == "Attention" and n.inputs[4] is not None)
    own.inputs[3].dtype = ir.DataType.BOOL
    assert not keeps_export_convention(model, "cpu")


def test_config_drops_inputs_the_rewritten_model_no_longer_takes(
    generated_package: Path,
) -> None:
    config = package_module.read_config(generated_package)
    original = ir.load(generated_package / "model.onnx")
    rewritten = ir.load(generated_package / "model.onnx")
    rewritten.graph.inputs[:] = [v for v in rewritten.graph.inputs if v.name != "position_ids"]
    changes = package_module._drop_missing_inputs(config, original, rewritten)
    assert [(c.key, c.before, c.after) for c in changes] == [
        ("model.decoder.inputs.position_ids", "position_ids", None)
    ]
    assert "position_ids" not in config["model"]["decoder"]["inputs"]
    assert "past_key_names" in config["model"]["decoder"]["inputs"]


def test_linked_files_are_copied_as_files(generated_package: Path, tmp_path: Path) -> None:
    """A package in a Hugging Face cache links its files into ../../blobs: the new folder
    gets the bytes, not a link that would point nowhere from there."""
    blob = tmp_path / "blob"
    blob.write_text('{"vocab": "from the cache"}')
    (generated_package / "tokenizer_config.json").symlink_to(blob)
    output = tmp_path / "out"
    assert _run(generated_package, output, "--no-verify", "--quiet") == 0
    copied = output / "tokenizer_config.json"
    assert not copied.is_symlink() and copied.read_text() == blob.read_text()


@pytest.mark.genai
def test_genai_benchmark_runs_and_writes_its_ratios(
    generated_package: Path, tmp_path: Path
) -> None:
    """Structure only: timings on a shared machine prove nothing."""
    rewritten, results = tmp_path / "rewritten", tmp_path / "genai.json"
    assert _run(generated_package, rewritten, "--speed", "off", "--quiet") == 0
    bench = Path(__file__).resolve().parent.parent / "bench" / "genai_bench.py"
    done = subprocess.run(
        [
            sys.executable,
            str(bench),
            str(generated_package),
            str(rewritten),
            *("--prompts", "8", "16", "--new-tokens", "4", "--rounds", "1"),
            *("--json", str(results)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(results.read_text())
    for length in (8, 16):
        for key in (f"genai_prefill_ratio_l{length}", f"genai_decode_ratio_l{length}"):
            assert math.isfinite(data[key]) and data[key] > 0, key
    assert data["packages"]["rewritten"]["past_present_share_buffer"] is True
    assert data["packages"]["original"]["past_present_share_buffer"] is False
