"""Hostile inputs, second round (issue 23): each is refused before any work, by name.

Every refusal is exit 2, one stderr line naming the node, value or path, no traceback, and
the output's directory as it was. The rewrite runs with its defaults (form probe, speed
probe, verification) but the probes are replaced by ones that fail the test if called: a
refusal must come before them. Models are the generator's tiny decoder with one defect
(``hostile_models``).
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from hostile_models import decoder, with_bad_utf8_name, with_cycle, with_head_count

from rewriter import cli
from rewriter._input_checks import INT32_MAX


def _listing(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(directory.iterdir())}


@pytest.fixture
def no_probes(monkeypatch):
    """Probing is the expensive part a bad input must never reach."""
    import rewriter.forms
    import rewriter.speed

    def probed(*_args, **_kwargs):
        raise AssertionError("a probe ran before the input was refused")

    monkeypatch.setattr(rewriter.forms.ProbedFormChooser, "__call__", probed)
    monkeypatch.setattr(rewriter.speed.SpeedProbe, "__call__", probed)


def _refused(capsys, source: Path, out: Path, *fragments: str, extra: tuple = ()) -> str:
    before = _listing(out.parent)
    code = cli.main([str(source), str(out), *extra])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert _listing(out.parent) == before, "a refused run wrote or removed something"
    return lines[0]


# --- item 1: bad graphs and attributes, refused up front ----------------------------------


def _write(tmp_path: Path, model: onnx.ModelProto | bytes) -> Path:
    source = tmp_path / "in.onnx"
    source.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    return source


def test_cycle_is_refused_naming_a_node_on_it(tmp_path, capsys, no_probes):
    model, name = with_cycle(decoder())
    source = _write(tmp_path, model)
    line = _refused(capsys, source, tmp_path / "out.onnx", "cycle")
    # The node named is on the cycle: layer 0's first node or one between it and layer 1.
    assert "/model/layers.0/" in line or "/model/layers.1/" in line, line
    assert name in line or "/model/layers." in line


@pytest.mark.parametrize(
    ("value", "fragments"),
    [
        (4.0, ("q_num_heads is FLOAT", "declares INT")),
        ("four", ("q_num_heads is STRING", "declares INT")),
        (-4, ("q_num_heads is -4", "must be positive")),
        (0, ("q_num_heads is 0", "must be positive")),
    ],
    ids=["float", "string", "negative", "zero"],
)
def test_mistyped_or_negative_head_count_is_refused(tmp_path, capsys, no_probes, value, fragments):
    model, name = with_head_count(decoder(), value)
    source = _write(tmp_path, model)
    _refused(capsys, source, tmp_path / "out.onnx", name, *fragments)


def test_name_that_is_not_utf8_is_refused(tmp_path, capsys, no_probes):
    source = _write(tmp_path, with_bad_utf8_name(decoder()))
    _refused(capsys, source, tmp_path / "out.onnx", "not valid UTF-8", "\\xff")


@pytest.mark.parametrize("own_cache", ["attention", "gqa"])
def test_window_beyond_int32_is_refused(tmp_path, capsys, no_probes, own_cache):
    """A 2^62 window: GroupQueryAttention's local_window_size is a 32-bit int in ORT.

    With Attention everywhere the mask's window is refused (the rewrite could not write it);
    with GroupQueryAttention layers the input's own local_window_size already does not fit.
    """
    window = 2**62
    source = _write(tmp_path, decoder(sliding_window=window, nonshared_attention=own_cache))
    what = "sliding window" if own_cache == "attention" else "local_window_size"
    _refused(capsys, source, tmp_path / "out.onnx", str(window), what, "32-bit")


def test_largest_int32_window_is_still_rewritten(tmp_path, capsys):
    source = _write(tmp_path, decoder(sliding_window=INT32_MAX))
    out = tmp_path / "out.onnx"
    code = cli.main([str(source), str(out), "--no-verify", "--quiet", "--speed=off"])
    assert code == 0, capsys.readouterr().err
    windows = {
        attribute.i
        for node in onnx.load(out).graph.node
        if node.op_type == "GroupQueryAttention"
        for attribute in node.attribute
        if attribute.name == "local_window_size"
    }
    assert windows == {INT32_MAX}


def test_library_refuses_the_same_inputs(no_probes):
    import onnx_ir as ir

    import rewriter

    model, _ = with_cycle(decoder())
    with pytest.raises(ir.passes.PreconditionError, match="cycle"):
        rewriter.rewrite(model)


def test_rule_says_a_negative_head_count_is_not_positive():
    """Called past requires() (the pass's call() alone), the rule's own reason is accurate."""
    import onnx_ir as ir

    from rewriter.passes import AttentionToGQAPass
    from rewriter.rules import always_past

    model, name = with_head_count(decoder(), -4)
    result = AttentionToGQAPass(choose_form=always_past).call(ir.from_proto(model))
    reasons = {skip["node"]: skip["reason"] for skip in result.report.to_dict()["skipped"]}
    assert "must be positive" in reasons[name], reasons
    assert "missing" not in reasons[name]


# --- item 3: the Hugging Face hub cache layout --------------------------------------------

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "p2_tiny.onnx"


def _hub_cache(root: Path) -> Path:
    """A replica of huggingface_hub's cache: the snapshot's files are symbolic links into
    ../../blobs/, named by content hash. Returns the snapshot's model.onnx (a link)."""
    import hashlib

    import onnx_ir as ir

    staging = root / "download"
    staging.mkdir()
    ir.save(ir.load(FIXTURE), staging / "model.onnx", external_data="model.onnx_data")
    repo = root / "models--example--tiny-gemma"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / ("ab" * 20)
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in ("model.onnx", "model.onnx_data"):
        data = (staging / name).read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob.name))
        (staging / name).unlink()
    staging.rmdir()
    return snapshot / "model.onnx"


def _tree(root: Path) -> dict[str, tuple[bool, int, int]]:
    return {
        str(p.relative_to(root)): (p.is_symlink(), p.lstat().st_size, p.lstat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def test_model_from_the_hub_cache_is_rewritten_and_verified(tmp_path, capsys):
    import onnxruntime as ort

    cache = tmp_path / "hub"
    cache.mkdir()
    model = _hub_cache(cache)
    # The claim the layout rests on: ONNX Runtime itself loads it.
    ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    before = _tree(cache)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "model.onnx"
    code = cli.main([str(model), str(out), "--quiet", "--speed=off", "--verify=layers"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert _tree(cache) == before, "the cache was changed"
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.onnx", "model.onnx.data"]
    ops = [node.op_type for node in onnx.load(out, load_external_data=False).graph.node]
    assert ops.count("Attention") == 0 and ops.count("GroupQueryAttention") == 7
    code = cli.main(["verify", str(model), str(out), "--quiet", "--verify=all"])
    assert code == 0, capsys.readouterr().err


def test_in_place_on_a_symlink_is_refused(tmp_path, capsys):
    cache = tmp_path / "hub"
    cache.mkdir()
    model = _hub_cache(cache)
    before = _tree(cache)
    line = _refused(
        capsys, model, model, "symbolic link", "--in-place", extra=("--in-place", "--no-verify")
    )
    assert str(model.resolve()) in line
    assert _tree(cache) == before


# --- item 4: what is wrong with an external-data location, said as it is -----------------


def _with_location(tmp_path: Path, location: str) -> Path:
    """p2_tiny with its weights in in.onnx.data, every tensor's location then set to `location`."""
    import onnx_ir as ir

    source = tmp_path / "in.onnx"
    ir.save(ir.load(FIXTURE), source, external_data="in.onnx.data")
    proto = onnx.load(source, load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, source)
    return source


@pytest.mark.parametrize(
    ("location", "prepare", "fragments"),
    [
        ("", None, ("location is empty",)),
        ("weights", lambda d: (d / "weights").mkdir(), ("'weights'", "is a directory")),
        (".", None, ("names the model's folder",)),
        ("/etc/hostname", None, ("absolute path",)),
        ("sub/../../x.data", None, ("leads out of the model's folder",)),
        ("zeros", lambda d: (d / "zeros").symlink_to("/dev/zero"), ("not a regular file",)),
        ("gone", lambda d: (d / "gone").symlink_to(d / "nowhere"), ("missing", "link to nothing")),
    ],
    ids=["empty", "directory", "dot", "absolute", "dotdot", "device", "dangling-link"],
)
def test_external_data_location_is_named_for_what_is_wrong(
    tmp_path, capsys, location, prepare, fragments
):
    source = _with_location(tmp_path, location)
    if prepare is not None:
        prepare(tmp_path)
    line = _refused(capsys, source, tmp_path / "out.onnx", str(source), *fragments)
    assert "hard link" not in line


# --- item 6: the library with a proto whose weights were not loaded -----------------------


def test_proto_without_its_weights_needs_a_base_dir(tmp_path, monkeypatch):
    import onnx_ir as ir

    import rewriter
    from rewriter.rules import always_past
    from rewriter.verification import VerificationError

    models = tmp_path / "models"
    models.mkdir()
    path = models / "in.onnx"
    ir.save(ir.load(FIXTURE), path, external_data="in.onnx.data")
    proto = onnx.load(path, load_external_data=False)

    with pytest.raises(ValueError, match="base_dir") as refused:
        rewriter.rewrite(proto, choose_form=always_past)
    assert "in.onnx.data" in str(refused.value)
    with pytest.raises(ValueError, match=r"no_such\.data"):
        broken = onnx.load(path, load_external_data=False)
        for tensor in broken.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = "no_such.data"
        rewriter.rewrite(broken, base_dir=models, choose_form=always_past)

    model, report = rewriter.rewrite(proto, base_dir=models, choose_form=always_past)
    assert report.rewritten == 3
    # The returned proto keeps locations relative to the model's folder: read from another
    # directory, they name files that are not there, and the verifier says which.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(VerificationError, match="cannot read the candidate model") as unread:
        rewriter.verify(path, model, mode="layers")
    assert str(elsewhere / "in.onnx.data") in str(unread.value)
    monkeypatch.chdir(models)
    assert rewriter.verify(path, model, mode="layers").passed
