"""The command line never corrupts a model, never overwrites the only copy, never dies with a
stack trace on an input it does not like (issue 7): bad inputs, bad outputs, --in-place,
external-data collisions, unknown opsets/domains, subgraphs and model-local functions.

Every bad input must give exit status 2, exactly one stderr line naming the problem, no
traceback, and leave the directory as it was. Most cases call ``cli.main`` in-process (fast);
the permission cases need a process without root's file-permission override, so they run the
CLI in a subprocess (with ``setpriv`` dropping CAP_DAC_OVERRIDE when the tests run as root).
Verification is skipped (``--no-verify``) except where ONNX Runtime is run here directly.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from rewriter import cli
from rewriter.fixtures.gemma4_like import build_decoder, tiny_config
from rewriter.metadata import METADATA_PREFIX
from rewriter.model_io import TOOL_METADATA_KEY, InputError

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "p2_tiny.onnx"


# --- helpers ------------------------------------------------------------------------------


def _main(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    args = [str(a) for a in argv]
    if args and args[0] not in ("verify", "probe"):
        # Which layers a rewrite converts must not hang on timing (rewriter.speed).
        args.append("--speed=off")
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _listing(directory: Path) -> dict[str, tuple[int, int]]:
    """Name -> (size, mtime) of everything in `directory`, hidden files included."""
    return {
        p.name: (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (-1, 0)
        for p in directory.iterdir()
    }


def _assert_bad(code: int, err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def _bad_run(
    capsys: pytest.CaptureFixture[str],
    directory: Path,
    argv: list[object],
    *fragments: str,
) -> str:
    before = _listing(directory)
    code, _, err = _main(capsys, *argv, "--no-verify")
    _assert_bad(code, err, *fragments)
    assert _listing(directory) == before, "a bad run wrote or removed something"
    return err.strip()


def _save_external(model: onnx.ModelProto | ir.Model, path: Path, data_name: str) -> None:
    if isinstance(model, onnx.ModelProto):
        model = ir.from_proto(model)
    ir.save(model, path, external_data=data_name)


def _initializer_arrays(path: Path) -> dict[str, np.ndarray]:
    model = ir.load(path)
    return {
        name: np.array(value.const_value.numpy())
        for graph in model.graphs()
        for name, value in graph.initializers.items()
        if value.const_value is not None
    }


def _prefill_feeds(model: onnx.ModelProto, length: int = 5) -> dict[str, np.ndarray]:
    """B=1 prefill with empty caches, from the model's own input signature."""
    feeds: dict[str, np.ndarray] = {}
    for graph_input in model.graph.input:
        name = graph_input.name
        if name == "input_ids":
            feeds[name] = np.arange(1, length + 1, dtype=np.int64)[None]
        elif name == "attention_mask":
            feeds[name] = np.ones((1, length), np.int64)
        elif name == "position_ids":
            feeds[name] = np.arange(length, dtype=np.int64)[None]
        else:
            dims = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
            dims[0], dims[2] = 1, 0  # [B, Nkv, past, D] with no past
            feeds[name] = np.zeros(dims, np.float32)
    return feeds


def _ort_outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _assert_same_outputs(original: Path, rewritten: Path) -> None:
    feeds = _prefill_feeds(onnx.load(original, load_external_data=False))
    for before, after in zip(
        _ort_outputs(original, feeds), _ort_outputs(rewritten, feeds), strict=True
    ):
        np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)


def _report(path: Path) -> dict:
    return json.loads(path.read_text())


def _no_staging_left(directory: Path) -> None:
    leftovers = [p.name for p in directory.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


# --- bad inputs ---------------------------------------------------------------------------


def _write_garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def _write_text(path: Path) -> None:
    path.write_text("this is not a model\n" * 20)


def _write_truncated(path: Path) -> None:
    data = FIXTURE.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _write_graph_proto(path: Path) -> None:
    # A valid protobuf of another ONNX message type that happens to parse as a ModelProto.
    graph = helper.make_graph([], "not_a_model", [], [])
    path.write_bytes(graph.SerializeToString())


def _write_empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize(
    ("make_input", "fragments"),
    [
        (None, ("no such file",)),
        (lambda p: p.mkdir(), ("is a directory",)),
        (lambda p: os.mkfifo(p), ("is not a regular file",)),
        (_write_empty, ("empty file",)),
        (_write_garbage, ("not an ONNX model", "cannot be parsed as protobuf")),
        (_write_text, ("not an ONNX model", "cannot be parsed as protobuf")),
        (_write_truncated, ("not an ONNX model", "truncated")),
        (_write_graph_proto, ("a protobuf message but not an ONNX model", "ir_version")),
    ],
    ids=["missing", "directory", "fifo", "empty", "garbage", "text", "truncated", "graph-proto"],
)
def test_bad_input_file(tmp_path, capsys, make_input, fragments):
    source = tmp_path / "in.onnx"
    if make_input is not None:
        make_input(source)
    _bad_run(capsys, tmp_path, [source, tmp_path / "out.onnx"], str(source), *fragments)


@pytest.fixture
def external_model(tmp_path) -> Path:
    """p2_tiny with every initializer over 256 bytes in in.onnx.data."""
    path = tmp_path / "in.onnx"
    _save_external(onnx.load(FIXTURE), path, "in.onnx.data")
    return path


def test_missing_external_data(tmp_path, capsys, external_model):
    (tmp_path / "in.onnx.data").unlink()
    _bad_run(
        capsys, tmp_path, [external_model, tmp_path / "out.onnx"], "in.onnx.data", "is missing"
    )


def test_short_external_data(tmp_path, capsys, external_model):
    data = tmp_path / "in.onnx.data"
    os.truncate(data, data.stat().st_size - 100)
    _bad_run(
        capsys,
        tmp_path,
        [external_model, tmp_path / "out.onnx"],
        "in.onnx.data",
        "shorter than the tensor needs",
    )


def test_external_data_outside_model_directory(tmp_path, capsys):
    inner = tmp_path / "models"
    inner.mkdir()
    _save_external(onnx.load(FIXTURE), tmp_path / "elsewhere.onnx", "shared.data")
    proto = onnx.load(tmp_path / "elsewhere.onnx", load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../shared.data"
    onnx.save(proto, inner / "in.onnx")
    _bad_run(capsys, inner, [inner / "in.onnx", inner / "out.onnx"], "../shared.data", "refused")


# --- bad outputs --------------------------------------------------------------------------


def test_output_directory_missing(tmp_path, capsys):
    _bad_run(capsys, tmp_path, [FIXTURE, tmp_path / "nope" / "out.onnx"], "does not exist")


def test_output_is_a_directory(tmp_path, capsys):
    (tmp_path / "out.onnx").mkdir()
    _bad_run(capsys, tmp_path, [FIXTURE, tmp_path / "out.onnx"], "is a directory")


def test_output_is_not_a_regular_file(tmp_path, capsys):
    os.mkfifo(tmp_path / "out.onnx")
    _bad_run(capsys, tmp_path, [FIXTURE, tmp_path / "out.onnx"], "not a regular file")


def test_report_directory_missing(tmp_path, capsys):
    argv = [FIXTURE, tmp_path / "out.onnx", "--report", tmp_path / "nope" / "r.json"]
    _bad_run(capsys, tmp_path, argv, "r.json", "does not exist")


@pytest.mark.parametrize("how", ["same-path", "symlink", "hardlink"])
def test_output_is_input_needs_in_place(tmp_path, capsys, how):
    source = tmp_path / "in.onnx"
    shutil.copy(FIXTURE, source)
    target = tmp_path / "out.onnx"
    if how == "same-path":
        target = source
    elif how == "symlink":
        target.symlink_to(source)
    else:
        os.link(source, target)
    _bad_run(capsys, tmp_path, [source, target], "is the input", "--in-place")


def test_output_is_the_inputs_external_data(tmp_path, capsys, external_model):
    _bad_run(
        capsys,
        tmp_path,
        [external_model, tmp_path / "in.onnx.data"],
        "is the input's external data file",
    )


def test_output_data_would_overwrite_inputs_data(tmp_path, capsys):
    # in.onnx keeps its weights in out.onnx.data: writing out.onnx must not replace them.
    source = tmp_path / "in.onnx"
    _save_external(onnx.load(FIXTURE), source, "out.onnx.data")
    _bad_run(capsys, tmp_path, [source, tmp_path / "out.onnx"], "is the input's external data")


def test_output_data_collides_with_foreign_file(tmp_path, capsys, external_model):
    (tmp_path / "out.onnx.data").write_bytes(b"somebody else's weights")
    _bad_run(
        capsys,
        tmp_path,
        [external_model, tmp_path / "out.onnx"],
        "refusing to overwrite",
        TOOL_METADATA_KEY,
    )


def test_output_data_of_a_model_not_written_by_this_tool(tmp_path, capsys, external_model):
    # out.onnx references out.onnx.data but carries no metadata of ours: not ours to replace.
    _save_external(onnx.load(FIXTURE), tmp_path / "out.onnx", "out.onnx.data")
    _bad_run(capsys, tmp_path, [external_model, tmp_path / "out.onnx"], "refusing to overwrite")


def test_metadata_key_is_the_one_the_pipeline_writes():
    assert TOOL_METADATA_KEY == METADATA_PREFIX + "version"


def test_output_data_written_by_this_tool_is_replaced(tmp_path, capsys, external_model):
    out = tmp_path / "out.onnx"
    for _ in range(2):  # the second run replaces its own out.onnx.data
        code, _, err = _main(capsys, external_model, out, "--no-verify", "--quiet")
        assert code == 0, err
    assert TOOL_METADATA_KEY in ir.load(out).metadata_props
    original = _initializer_arrays(external_model)
    rewritten = _initializer_arrays(out)
    for name in set(original) & set(rewritten):
        np.testing.assert_array_equal(rewritten[name], original[name])
    _no_staging_left(tmp_path)


@pytest.mark.parametrize(
    "data_name", [None, "in.onnx.data", "weights.bin"], ids=["inline", "in.onnx.data", "other"]
)
def test_in_place_replaces_atomically_with_weights(tmp_path, capsys, data_name):
    source = tmp_path / "in.onnx"
    if data_name:
        _save_external(onnx.load(FIXTURE), source, data_name)
    else:
        shutil.copy(FIXTURE, source)
    original = _initializer_arrays(source)
    reference = tmp_path / "reference.onnx"
    shutil.copy(FIXTURE, reference)
    report = tmp_path / "report.json"
    code, _, err = _main(
        capsys, source, source, "--in-place", "--no-verify", "--quiet", "--report", report
    )
    assert code == 0, err
    assert _report(report)["rewritten"] == 3
    rewritten = ir.load(source)
    assert TOOL_METADATA_KEY in rewritten.metadata_props
    ops = [node.op_type for node in rewritten.graph]
    assert ops.count("Attention") == 0
    after = _initializer_arrays(source)
    for name in set(original) & set(after):
        np.testing.assert_array_equal(after[name], original[name])
    onnx.checker.check_model(str(source), full_check=True)
    _assert_same_outputs(reference, source)
    # The weights were replaced under their own name: no second copy, no temporary left.
    expected = {"in.onnx", "reference.onnx", "report.json"}
    if data_name:
        expected.add(data_name)
    assert {p.name for p in tmp_path.iterdir()} == expected


def test_unreadable_input_and_unwritable_output(tmp_path_world):
    """Real permission errors, in a process that file permissions apply to."""
    directory = tmp_path_world
    unreadable = directory / "unreadable.onnx"
    shutil.copy(FIXTURE, unreadable)
    unreadable.chmod(0)
    locked = directory / "locked"
    locked.mkdir()
    readable = directory / "in.onnx"
    shutil.copy(FIXTURE, readable)
    readable.chmod(0o644)
    locked.chmod(0o555)
    for argv, fragments in [
        ([unreadable, directory / "out.onnx"], ("unreadable.onnx", "not readable")),
        ([readable, locked / "out.onnx"], ("locked", "not writable")),
    ]:
        before = _listing(directory)
        result = _run_unprivileged([*argv, "--no-verify"])
        _assert_bad(result.returncode, result.stderr, *fragments)
        assert _listing(directory) == before
        assert not list(locked.iterdir())


def test_debug_shows_the_traceback(tmp_path, capsys):
    argv = [str(tmp_path / "missing.onnx"), str(tmp_path / "o.onnx")]
    _assert_bad(cli.main(argv), capsys.readouterr().err, "no such file")
    with pytest.raises(InputError, match="no such file"):
        cli.main([*argv, "--debug"])


@pytest.fixture
def tmp_path_world() -> Iterator[Path]:
    """A directory that an unprivileged user can enter (pytest's tmp_path is 0700 for root)."""
    directory = Path(tempfile.mkdtemp(prefix="kvshare-robustness-"))
    directory.chmod(0o777)
    try:
        yield directory
    finally:
        for path in [directory, *directory.rglob("*")]:
            if not path.is_symlink():
                path.chmod(0o777 if path.is_dir() else 0o666)
        shutil.rmtree(directory)


def _run_unprivileged(argv: list[object]) -> subprocess.CompletedProcess[str]:
    """Run the CLI where chmod is honoured: as is, or as root without the DAC override."""
    command = [sys.executable, "-m", "rewriter", *map(str, argv)]
    kwargs: dict = {}
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            caps = "-dac_override,-dac_read_search"
            command = [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}", *command]
        else:  # no setpriv: become nobody (the venv and the test directory are readable)
            kwargs = {"user": 65534, "group": 65534, "extra_groups": []}
    return subprocess.run(command, capture_output=True, text=True, **kwargs)


# --- opsets and domains the rules do not know ---------------------------------------------


def test_unknown_ai_onnx_opset_is_left_alone(tmp_path, capsys):
    proto = build_decoder(tiny_config(mask_style="p2"))
    for opset in proto.opset_import:
        if opset.domain == "":
            opset.version = 25
    source = tmp_path / "in.onnx"
    onnx.save(proto, source)
    report = tmp_path / "report.json"
    code, out, err = _main(capsys, source, tmp_path / "out.onnx", "--no-verify", "--report", report)
    assert code == 0, err
    data = _report(report)
    assert data["rewritten"] == 0
    assert len(data["skipped"]) == 3
    assert all("opset 25" in skip["reason"] for skip in data["skipped"])
    assert "opset 25" in out
    written = onnx.load(tmp_path / "out.onnx")
    assert [n.op_type for n in written.graph.node].count("Attention") == 3


def test_unknown_domain_is_left_alone_and_reported(tmp_path, capsys):
    proto = build_decoder(tiny_config(mask_style="p2"))
    # A node of a domain nobody here knows, reading the logits (its output is unused).
    proto.graph.node.append(
        helper.make_node("Tag", ["logits"], ["tagged_logits"], domain="com.example", name="tag")
    )
    proto.opset_import.append(helper.make_opsetid("com.example", 3))
    source = tmp_path / "in.onnx"
    onnx.save(proto, source)
    report = tmp_path / "report.json"
    code, out, err = _main(capsys, source, tmp_path / "out.onnx", "--no-verify", "--report", report)
    assert code == 0, err
    data = _report(report)
    assert data["rewritten"] == 3
    assert any("com.example" in warning for warning in data["warnings"]), data["warnings"]
    assert "com.example" in out
    written = onnx.load(tmp_path / "out.onnx")
    tags = [n for n in written.graph.node if n.domain == "com.example"]
    assert [n.op_type for n in tags] == ["Tag"]
    onnx.checker.check_model(written, full_check=True)


# --- subgraphs and model-local functions --------------------------------------------------


def _prefixed_branch(graph: onnx.GraphProto, prefix: str) -> onnx.GraphProto:
    """`graph` as an If branch: no inputs (they come from the outer scope), names prefixed."""
    outer = {graph_input.name for graph_input in graph.input}
    body = copy.deepcopy(graph)
    defined = {t.name for t in body.initializer} | {o for n in body.node for o in n.output}
    rename = {name: prefix + name for name in defined if name and name not in outer}
    for tensor in body.initializer:
        tensor.name = rename[tensor.name]
    for node in body.node:
        node.name = prefix + node.name
        node.input[:] = [rename.get(name, name) for name in node.input]
        node.output[:] = [rename.get(name, name) for name in node.output]
    for info in (*body.output, *body.value_info):
        info.name = rename.get(info.name, info.name)
    del body.input[:]
    body.name = prefix + "branch"
    return body


def _if_wrapped_decoder() -> onnx.ModelProto:
    """The whole decoder, shared layers included, inside both branches of an If."""
    model = build_decoder(tiny_config(mask_style="p2"))
    graph = model.graph
    branch = helper.make_node(
        "If",
        ["use_then_branch"],
        [output.name for output in graph.output],
        name="/branch/If",
        then_branch=_prefixed_branch(graph, "then/"),
        else_branch=_prefixed_branch(graph, "else/"),
    )
    condition = numpy_helper.from_array(np.array(True), "use_then_branch")
    outer = helper.make_graph(
        [branch], "if_wrapped", list(graph.input), list(graph.output), [condition]
    )
    return helper.make_model(
        outer, opset_imports=list(model.opset_import), ir_version=model.ir_version
    )


def _function_wrapped_decoder(with_value_info: bool) -> onnx.ModelProto:
    """The whole decoder as a model-local function (initializers become Constant nodes)."""
    config = tiny_config(mask_style="p2")
    model = build_decoder(config)
    graph = model.graph
    constants = [
        helper.make_node("Constant", [], [t.name], name=f"/const/{t.name}", value=t)
        for t in graph.initializer
    ]
    function = helper.make_function(
        "local.decoder",
        "Decoder",
        [graph_input.name for graph_input in graph.input],
        [output.name for output in graph.output],
        constants + list(graph.node),
        list(model.opset_import),
    )
    if with_value_info:  # what the rules need to know dtypes and head sizes inside
        function.value_info.extend(onnx.shape_inference.infer_shapes(model).graph.value_info)
    call = helper.make_node(
        "Decoder",
        [graph_input.name for graph_input in graph.input],
        [output.name for output in graph.output],
        domain="local.decoder",
        name="/decoder",
    )
    outer = helper.make_graph([call], "function_wrapped", list(graph.input), list(graph.output))
    return helper.make_model(
        outer,
        opset_imports=[*model.opset_import, helper.make_opsetid("local.decoder", 1)],
        ir_version=max(model.ir_version, 10),
        functions=[function],
    )


def _rewrite_and_check(tmp_path: Path, capsys, proto: onnx.ModelProto) -> tuple[dict, Path]:
    onnx.checker.check_model(proto, full_check=True)
    source, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(proto, source)
    code, _, err = _main(capsys, source, out, "--no-verify", "--quiet", "--report", report)
    assert code == 0, err
    onnx.checker.check_model(str(out), full_check=True)
    _assert_same_outputs(source, out)
    return _report(report), out


def _left_inside(report: dict, expected: int) -> None:
    """Layers inside an If branch or a function are left alone, each with the reason: they
    cannot be cut out and proven on their own (issue 21)."""
    assert report["rewritten"] == 0
    reasons = [skip["reason"] for skip in report["skipped"]]
    assert len(reasons) == expected
    assert all(reason.startswith("inside a subgraph") for reason in reasons)


def test_shared_layers_inside_if_branches_are_left_with_their_reason(tmp_path, capsys):
    report, out = _rewrite_and_check(tmp_path, capsys, _if_wrapped_decoder())
    _left_inside(report, 6)  # 3 shared layers in each branch
    branch = onnx.load(out).graph.node[0]
    for attribute in branch.attribute:
        ops = [node.op_type for node in attribute.g.node]
        assert ops.count("Attention") == 3


def test_shared_layers_inside_a_local_function_are_left_with_their_reason(tmp_path, capsys):
    report, out = _rewrite_and_check(tmp_path, capsys, _function_wrapped_decoder(True))
    _left_inside(report, 3)
    ops = [node.op_type for node in onnx.load(out).functions[0].node]
    assert ops.count("Attention") == 3


def test_local_function_without_types_is_reported_not_broken(tmp_path, capsys):
    # No value_info inside the function: the rules cannot tell dtype and head size, skip each
    # layer with a reason, and the model comes out unchanged in what it computes.
    report, out = _rewrite_and_check(tmp_path, capsys, _function_wrapped_decoder(False))
    assert report["rewritten"] == 0
    assert len(report["skipped"]) == 3
    assert all(skip["reason"] for skip in report["skipped"])
    ops = [node.op_type for node in onnx.load(out).functions[0].node]
    assert ops.count("Attention") == 3


@pytest.mark.parametrize("target", ["input", "output"])
def test_report_never_overwrites_a_model(tmp_path, capsys, target):
    source = tmp_path / "in.onnx"
    shutil.copy(FIXTURE, source)
    out = tmp_path / "out.onnx"
    report = source if target == "input" else out
    _bad_run(capsys, tmp_path, [source, out, "--report", report], "--report", "would overwrite")
