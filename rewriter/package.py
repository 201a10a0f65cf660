"""An onnxruntime-genai model package in, a rewritten package out.

A package is a folder with ``genai_config.json`` naming its decoder model
(``model.decoder.filename``) beside tokenizer files and anything else. The rewritten package
is a new folder (``model_io.staged_folder``: staged beside it, renamed into place): the
decoder model rewritten, every other file copied unchanged, and the config updated for what the
rewrite changed:

* ``model.decoder.inputs``: entries naming inputs the rewritten model no longer takes go.
* ``search.past_present_share_buffer``: genai then binds one max-length buffer as both past and
  present of each cache. ONNX ``Attention`` refuses that (its mask is shorter than the buffer:
  "inconsistent total_sequence_length"); GroupQueryAttention is built for it. So it is turned
  on only when every cache input of the rewritten model feeds GroupQueryAttention's past, and
  greedy generation with onnxruntime-genai in that mode gives the original's tokens and logits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx_ir as ir

from rewriter._paths import external_tensors
from rewriter.model_io import InputError, OutputError, check_new_folder
from rewriter.rules import LayerKind, SpeedChoice, SpeedChooser
from rewriter.verification._genai import (
    GenerationRun,
    Generations,
    compare_generations,
    genai_available,
    generate,
)

__all__ = [
    "CONFIG_NAME",
    "GENAI_OWN_CACHE",
    "ConfigChange",
    "GenerationFailed",
    "PackageResult",
    "PackageSpeed",
    "check_package_destination",
    "copy_package",
    "decoder_path",
    "finish_package",
    "is_package",
    "keeps_export_convention",
    "read_config",
]

CONFIG_NAME = "genai_config.json"
_SHARE = "past_present_share_buffer"


# genai feeds every layer the same attention_mask; a layer with its own cache kept as Attention
# appends each decode token after a row's padding while GroupQueryAttention layers put it
# right after the row's valid tokens, so one model holding both gives wrong tokens in genai's
# batched decode (measured on the corpus package), and only GroupQueryAttention takes the
# shared buffer.
GENAI_OWN_CACHE = SpeedChoice(
    "gqa",
    "gqa",
    "gqa: an onnxruntime-genai package: every layer with its own cache follows one cache "
    "convention, GroupQueryAttention's (a layer kept as Attention breaks genai's batched "
    "decode beside GQA layers, and refuses genai's shared past/present buffer)",
)


class PackageSpeed:
    """--speed auto for a package: KV-shared layers get what `chooser` (the CLI's speed
    probe) gives them; layers with their own cache too where every decode step keeps the
    export's cache convention (`export_convention`, see keeps_export_convention), else GQA
    (GENAI_OWN_CACHE), so that genai's one mask means the same to every layer."""

    def __init__(self, chooser: SpeedChooser, *, export_convention: bool = False) -> None:
        self.chooser = chooser
        self.export_convention = export_convention

    def __call__(self, layer: LayerKind) -> SpeedChoice:
        if not layer.own_cache:
            return self.chooser(layer)
        choice = self.chooser(layer)
        if self.export_convention and choice.decode in ("fold", "export"):
            return choice
        return GENAI_OWN_CACHE


def keeps_export_convention(model: ir.Model, provider: str) -> bool:
    """Whether the CPU fixed choices (rewriter.speed.fixed_choice) keep every decode step of
    `model` in the export's cache convention, a right-padded row's new key after its
    padding, as genai's batched decode feeds it: every Attention of the main graph is a
    correct float32 export (an additive float bias, P2; is_causal=0, or 1 with past inputs),
    so a layer with its own cache folds over Concat(past, new) and a KV-shared layer folds
    over the export's own bias. A P1 export (a boolean mask) becomes GQA, and a defective
    export's fold builds GQA's mask, which wants the new key right after a row's valid keys.
    A reading of the graph ahead of the rules: where it errs, the genai proof's batch-2 run
    refuses the package (tokens differ) and nothing is written."""
    if provider != "cpu":
        return False
    attention = [n for n in model.graph if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]
    return bool(attention) and all(
        len(node.inputs) > 3
        and node.inputs[3] is not None
        and node.inputs[3].dtype == ir.DataType.FLOAT  # P2's bias, not P1's boolean mask
        # is_causal=1 is aligned to the bottom right with past inputs: correct there.
        and (not node.attributes.get_int("is_causal", 0) or _has_past(node))
        and node.inputs[0] is not None
        and node.inputs[0].dtype == ir.DataType.FLOAT
        for node in attention
    )


def _has_past(attention: ir.Node) -> bool:
    return len(attention.inputs) > 4 and attention.inputs[4] is not None


def is_package(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def read_config(package: Path) -> dict[str, Any]:
    config_path = package / CONFIG_NAME
    try:
        config = json.loads(config_path.read_text())
        filename = config["model"]["decoder"]["filename"]
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{config_path}: not readable ({error})") from None
    except json.JSONDecodeError as error:
        raise InputError(f"{config_path}: not JSON ({error})") from None
    except (KeyError, TypeError):
        raise InputError(f"{config_path}: no model.decoder.filename") from None
    if not isinstance(filename, str) or os.path.isabs(filename) or ".." in Path(filename).parts:
        raise InputError(
            f"{config_path}: model.decoder.filename {filename!r} is not in the package"
        )
    return config


def decoder_path(package: Path, config: dict[str, Any]) -> Path:
    return package / config["model"]["decoder"]["filename"]


def check_package_destination(package: Path, output: Path) -> None:
    """OutputError (one line) for an OUT that exists or lies inside the package."""
    inside = output.resolve()
    if inside == package.resolve() or package.resolve() in inside.parents:
        raise OutputError(f"{output}: is inside the input package {package}")
    check_new_folder(output)


def copy_package(package: Path, staged: Path, model: ir.Model, model_path: Path) -> None:
    """Copy every file of `package` into `staged` except the decoder model and its weights
    (the rewrite writes those). Symbolic links are copied as the files they name: a package
    in a Hugging Face cache links into ../../blobs, which the new folder does not have."""
    skip = {model_path.resolve(), *(Path(t.path).resolve() for t in external_tensors(model))}
    for entry in package.iterdir():
        if entry.resolve() in skip:
            continue
        if entry.is_dir():
            shutil.copytree(entry, staged / entry.name)
        else:
            shutil.copy2(entry, staged / entry.name)


@dataclasses.dataclass(frozen=True)
class ConfigChange:
    key: str
    before: Any
    after: Any
    reason: str

    def line(self) -> str:
        change = f"{json.dumps(self.before)} -> {json.dumps(self.after)}"
        return f"config {self.key}: {change} ({self.reason})"


@dataclasses.dataclass
class PackageResult:
    changes: list[ConfigChange] = dataclasses.field(default_factory=list)
    kept: list[str] = dataclasses.field(default_factory=list)  # why a setting was not changed
    generation: list[GenerationRun] = dataclasses.field(default_factory=list)
    skipped: str | None = None  # why no generation ran
    hint: str | None = None  # what to do when the generation differs

    @property
    def passed(self) -> bool:
        return all(run.passed for run in self.generation)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config_changes": [dataclasses.asdict(c) for c in self.changes],
            "config_kept": list(self.kept),
            "generation": {
                "passed": self.passed,
                "skipped": self.skipped,
                "runs": [run.to_dict() for run in self.generation],
                "hint": self.hint,
            },
        }

    def lines(self) -> list[str]:
        out = [change.line() for change in self.changes]
        out += [f"config unchanged: {why}" for why in self.kept]
        out += [run.line() for run in self.generation]
        if self.skipped:
            out.append(f"genai generation skipped ({self.skipped})")
        if self.hint:
            out.append(f"hint: {self.hint}")
        return out


def finish_package(
    package: Path,
    staged: Path,
    config: dict[str, Any],
    original: ir.Model,
    rewritten: ir.Model,
    *,
    verify: str | None,
    progress: Callable[[str], None] | None = None,
) -> PackageResult:
    """Update the staged package's config; prove it with onnxruntime-genai.

    verify: None to run the generation proof, else why it does not run (the share buffer then
    stays as it was: it is turned on only by a run that proves it).
    """
    say = progress or (lambda _message: None)
    result = PackageResult()
    config = json.loads(json.dumps(config))
    result.changes += _drop_missing_inputs(config, original, rewritten)
    search = config.setdefault("search", {})
    declared = bool(search.get(_SHARE, False))
    blockers = [] if declared else _share_buffer_blockers(config, rewritten)
    if blockers:
        more = f" (and {len(blockers) - 1} more)" if len(blockers) > 1 else ""
        result.kept.append(f"{_SHARE} stays false: {blockers[0]}{more}")
    if verify is None and not genai_available():
        verify = "onnxruntime-genai is not installed: pip install '.[genai]'"
    if verify is not None:
        result.skipped = verify
        if not declared and not blockers:
            result.kept.append(f"{_SHARE} stays false: not proven by a genai run ({verify})")
        _write_config(staged, config)
        return result

    _write_config(staged, config)
    say("genai: greedy generation on the original package")
    try:
        reference = generate(package)
    except RuntimeError as error:
        result.skipped = f"onnxruntime-genai cannot run the original package: {error}"
        if not declared and not blockers:
            result.kept.append(f"{_SHARE} stays false: not proven by a genai run")
        return result
    share = declared
    twins: list[Generations | None] = []

    def twin() -> Generations | None:
        # The original once more, graph optimizations disabled: its own spread, asked for
        # only where logits miss their tolerance (_genai.compare_generations).
        if not twins:
            say("genai: the original again, graph optimizations disabled (its own spread)")
            try:
                twins.append(generate(package, optimized=False))
            except RuntimeError:
                twins.append(None)
        return twins[0]

    if not declared and not blockers:
        say("genai: greedy generation on the rewritten package, shared past/present buffer")
        try:
            runs = compare_generations(
                reference, generate(staged, share_buffer=True), share_buffer=True, twin=twin
            )
        except RuntimeError as error:
            result.kept.append(f"{_SHARE} stays false: genai's run with it failed ({error})")
        else:
            if all(run.passed for run in runs):
                share = True
                search[_SHARE] = True
                result.changes.append(
                    ConfigChange(
                        f"search.{_SHARE}",
                        False,
                        True,
                        "every cache input feeds GroupQueryAttention's past, and genai's greedy "
                        "generation with the shared buffer gives the original's tokens and "
                        "logits",
                    )
                )
                result.generation = runs
                _write_config(staged, config)
                return result
            result.kept.append(
                f"{_SHARE} stays false: with it, genai's generation differs from the original's"
            )
    say("genai: greedy generation on the rewritten package")
    try:
        candidate = generate(staged, share_buffer=share)
    except RuntimeError as error:
        raise GenerationFailed(
            f"onnxruntime-genai cannot run the rewritten package: {error}"
        ) from None
    result.generation = compare_generations(reference, candidate, share_buffer=share, twin=twin)
    attention_caches = any(b.startswith("cache input") for b in blockers)
    if attention_caches and not result.passed:
        result.hint = (
            "layers with their own cache kept as Attention append each new token after the "
            "padding, while the rewritten layers follow GroupQueryAttention's convention (right "
            "after each row's valid tokens), and genai's batched decode feeds both one mask; "
            "rerun with --layers all (every layer with its own cache becomes "
            "GroupQueryAttention; with --speed off as well, every layer, and the shared buffer "
            "can be turned on) or --exact-padding (the rewritten layers keep the original "
            "cache layout)"
        )
    return result


class GenerationFailed(Exception):
    """genai ran the original package but not the rewritten one."""


def _write_config(staged: Path, config: dict[str, Any]) -> None:
    path = staged / CONFIG_NAME
    path.unlink(missing_ok=True)  # the copy keeps the input's mode, which may be read-only
    # mobius and the genai builder write 4-space indented JSON.
    path.write_text(json.dumps(config, indent=4) + "\n")


def _input_names(model: ir.Model) -> set[str]:
    return {value.name for value in model.graph.inputs if value.name}


def _drop_missing_inputs(
    config: dict[str, Any], original: ir.Model, rewritten: ir.Model
) -> list[ConfigChange]:
    inputs = config["model"]["decoder"].get("inputs", {})
    before, after = _input_names(original), _input_names(rewritten)
    changes = []
    for key, name in list(inputs.items()):
        if not isinstance(name, str):
            continue
        probe = name % 0 if "%d" in name else name
        if probe in before and probe not in after:
            del inputs[key]
            changes.append(
                ConfigChange(
                    f"model.decoder.inputs.{key}",
                    name,
                    None,
                    f"the rewritten model no longer takes input {probe}",
                )
            )
    return changes


def _cache_inputs(config: dict[str, Any], model: ir.Model) -> list[ir.Value]:
    names = config["model"]["decoder"].get("inputs", {})
    patterns = [
        re.escape(names[key]).replace("%d", r"\d+")
        for key in ("past_key_names", "past_value_names")
        if isinstance(names.get(key), str)
    ]
    return [
        value
        for value in model.graph.inputs
        if any(re.fullmatch(pattern, value.name or "") for pattern in patterns)
    ]


def _share_buffer_blockers(config: dict[str, Any], model: ir.Model) -> list[str]:
    """Why genai's shared past/present buffer cannot work: each cache input that feeds
    something other than GroupQueryAttention's past_key/past_value (inputs 3 and 4), and each
    ONNX Attention left anywhere (If branches included): with the shared buffer every cache is
    max-length while the mask is as long as the tokens so far, which Attention refuses."""
    caches = _cache_inputs(config, model)
    if not caches:
        return ["the model has no input the config's past_key_names / past_value_names match"]
    blockers = []
    for value in caches:
        for node, index in value.uses():
            if not (_is_gqa(node) and index in (3, 4)):
                blockers.append(
                    f"cache input {value.name} feeds {node.op_type} {node.name}, and only "
                    "GroupQueryAttention takes genai's shared buffer (an Attention layer the "
                    "report lists as skipped, or the own-cache fold appending with Concat)"
                )
                break
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
            blockers.append(
                f"{node.name} is ONNX Attention (a speed choice's decode fold reads the "
                "borrowed cache with it), which refuses genai's max-length shared buffer; "
                "--speed off makes every layer GroupQueryAttention"
            )
    return blockers


def _is_gqa(node: ir.Node) -> bool:
    return node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft"
