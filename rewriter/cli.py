"""The command line: ``python -m rewriter [rewrite] IN OUT``, ``... verify A B``, ``... probe``.

Three argparse subcommands; ``rewrite`` is the default, so ``python -m rewriter IN OUT`` means
``python -m rewriter rewrite IN OUT``. IN may be an onnxruntime-genai package folder
(``rewriter.package``): OUT is then a new folder.

Exit codes: 0 done (verified, or nothing to do); 1 verification failed (nothing written);
2 bad usage or input (one line on stderr, nothing written); 3 internal error;
130/143 interrupted by SIGINT/SIGTERM (the output is then absent, unchanged or complete).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import onnx_ir as ir

from rewriter import __version__
from rewriter._error_text import first_line
from rewriter._paths import same_file
from rewriter.console import verification_console
from rewriter.forms import FormRejectedError
from rewriter.metadata import record_verification
from rewriter.model_io import (
    InputError,
    Interrupted,
    OutputError,
    check_destination,
    external_data_name,
    load_model,
    signals_as_exceptions,
    staged_folder,
    staged_output,
)
from rewriter.package import (
    GenerationFailed,
    PackageResult,
    PackageSpeed,
    check_package_destination,
    copy_package,
    decoder_path,
    finish_package,
    is_package,
    keeps_export_convention,
    read_config,
)
from rewriter.pipeline import rewrite
from rewriter.probe import FORMS, ProbeError, probe
from rewriter.report import RewriteReport

if TYPE_CHECKING:
    from rewriter.verification import VerificationResult

__all__ = ["main"]

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


_NOTHING_REWRITTEN = "nothing was rewritten: the output graph is the input's"


class _UsageError(Exception):
    pass


class _VerificationFailed(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, like every other bad input
        raise _UsageError(f"{self.prog}: {message}")


def _add_provider(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--provider",
        choices=("cpu", "cuda"),
        default="cpu",
        help="ONNX Runtime execution provider for the probe and the verifier (default cpu)",
    )


def _add_verify_mode(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verify",
        choices=("auto", "layers", "model", "all"),
        default="auto",
        dest="verify_mode",
        help="layers: prove each rewritten layer on its own (small, any model size) and "
        "diff the graph outside them; model: the whole-model checks (two full sessions); "
        "all: both; auto (default): layers, plus model where its estimated memory fits",
    )


_PROG = "python -m rewriter"
_REWRITE, _VERIFY, _PROBE = "rewrite", "verify", "probe"


def _parser() -> argparse.ArgumentParser:
    """The command line as one parser with a subparser per subcommand; each subparser names
    the function that runs it (``command``)."""
    parser = _Parser(
        prog=_PROG,
        description="Rewrite the Attention layers of an LLM export into ONNX Runtime's "
        "GroupQueryAttention (or faster equivalent forms) and prove the result on ONNX "
        f"Runtime. '{_PROG} IN OUT [options]' is short for '{_PROG} {_REWRITE} IN OUT "
        "[options]'.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subcommands = parser.add_subparsers(title="subcommands", metavar="SUBCOMMAND")
    _add_rewrite_arguments(
        subcommands.add_parser(
            _REWRITE,
            # The subcommand's name may be left out, so its usage and errors read as they
            # always have: python -m rewriter IN OUT.
            prog=_PROG,
            help="rewrite a model or an onnxruntime-genai package and verify it "
            "(the default subcommand)",
            description="Rewrite the Attention layers of IN and verify the result on ONNX "
            f"Runtime before writing OUT. The subcommand name may be left out: '{_PROG} IN "
            "OUT'. Exit codes: 0 written, 1 verification failed (nothing written), 2 bad "
            "usage or input, 3 internal error.",
        )
    )
    _add_verify_arguments(
        subcommands.add_parser(
            _VERIFY,
            help="check a rewrite made elsewhere against its original",
            description="Check on ONNX Runtime that CANDIDATE computes what ORIGINAL means. "
            "Exit codes: 0 passed, 1 failed, 2 bad usage or input, 3 internal error.",
        )
    )
    _add_probe_arguments(
        subcommands.add_parser(
            _PROBE,
            help="which GroupQueryAttention forms the installed ONNX Runtime runs correctly",
            description="Which GroupQueryAttention forms the installed ONNX Runtime runs "
            "correctly: tiny one-node models per form against a float64 NumPy reference.",
        )
    )
    return parser


def _with_subcommand(argv: list[str]) -> list[str]:
    """`argv` with its subcommand named: rewrite is the default (``IN OUT [options]``)."""
    if argv and argv[0] in (_REWRITE, _VERIFY, _PROBE, "-h", "--help", "--version"):
        return argv
    return [_REWRITE, *argv]


def _add_rewrite_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(command=_rewrite_command, subcommand_parser=parser)
    parser.add_argument(
        "input",
        type=Path,
        help="model to rewrite, or an onnxruntime-genai package folder (with "
        "genai_config.json); never modified",
    )
    parser.add_argument(
        "output",
        type=Path,
        help="where to write the rewritten model (for a package: a new folder)",
    )
    parser.add_argument(
        "--report", type=Path, help="write the JSON report here ('-': to standard output)"
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime proof")
    _add_verify_mode(parser)
    parser.add_argument(
        "--form",
        choices=("auto", *FORMS),
        default="auto",
        help="GroupQueryAttention form: auto = best form the probe found correct (default)",
    )
    parser.add_argument(
        "--layers",
        choices=("all", "shared"),
        default="all",
        help="all: KV-shared layers and layers with their own cache (default); "
        "shared: KV-shared layers only",
    )
    parser.add_argument(
        "--force", action="store_true", help="write a --form the probe rejected (marked)"
    )
    parser.add_argument(
        "--exact-padding",
        action="store_true",
        help="pass the mask as attention_bias so left padding/holes keep exact semantics",
    )
    parser.add_argument(
        "--speed",
        choices=("auto", "off"),
        default="auto",
        help="auto (default): float32 KV-shared layers on CPU get If(S == 1: fold, else: "
        "gqa), measured once and fixed (nothing timed); every other layer kind whose export "
        "is correct is timed as GQA, as the export's Attention and (KV-shared) as Attention "
        "reading the cache in place, in prefill and decode on the provider, and gets the "
        "fastest (one per phase behind an If on S == 1 where measured faster); seconds per "
        "timed layer kind. off: every layer that qualifies becomes GroupQueryAttention, as "
        "rewriter.rewrite() does by default",
    )
    parser.add_argument(
        "--no-window-slice",
        dest="window_slice",
        action="store_false",
        help="let sliding KV-shared layers read the whole borrowed cache, not only the keys "
        "their window reaches",
    )
    parser.add_argument(
        "--in-place", action="store_true", help="allow OUTPUT to be INPUT (atomic replace)"
    )
    _add_provider(parser)
    _add_output_options(parser)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="print errors only")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="print every check and case of the verification, and every step of its progress",
    )
    parser.add_argument("--debug", action="store_true", help="tracebacks on errors")


def _add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(command=_verify_command, subcommand_parser=parser)
    parser.add_argument("original", type=Path, help="the model as exported")
    parser.add_argument(
        "candidate", type=Path, help="its rewrite, to be checked against the original"
    )
    parser.add_argument(
        "--decode",
        nargs=2,
        type=Path,
        metavar=("ORIGINAL_DECODE", "CANDIDATE_DECODE"),
        help="exports split into prefill and decode graphs (transformers' exporter): ORIGINAL "
        "and CANDIDATE are the prefill graphs, these the decode graphs, verified as a pair "
        "(the decode graph fed the prefill graph's cache)",
    )
    parser.add_argument(
        "--report", type=Path, help="write the JSON report here ('-': to standard output)"
    )
    _add_verify_mode(parser)
    _add_provider(parser)
    _add_output_options(parser)


def _add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(command=_probe_command, subcommand_parser=parser)
    _add_provider(parser)
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "float16", "bfloat16"],
        help="element types to probe (default: float32 float16 bfloat16)",
    )
    parser.add_argument(
        "--head-sizes",
        nargs="+",
        type=int,
        default=[64, 256, 512],
        help="head sizes D to probe (default: 64 256 512)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--debug", action="store_true", help="tracebacks on errors")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        with signals_as_exceptions():
            args = _parse(_with_subcommand(argv))
            return args.command(args)
    except _VerificationFailed:
        return EXIT_VERIFY_FAILED
    except (
        _UsageError,
        InputError,
        OutputError,
        FormRejectedError,
        ProbeError,
        ir.passes.PreconditionError,  # the model is not one the rewrite can take
    ) as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Interrupted as interruption:
        if debug:
            raise
        outcome = (
            f"{interruption.written} was written completely"
            if interruption.written is not None
            else "nothing was written"
        )
        print(f"error: interrupted by {interruption.signal_name}; {outcome}", file=sys.stderr)
        return 128 + interruption.signum
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            raise
        print(
            f"error: internal error: {type(error).__name__}: {first_line(error)} "
            "(--debug for details)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = _parser()
    args, unrecognized = parser.parse_known_args(argv)
    if unrecognized:
        # Said by the subcommand's parser, as before subparsers (argparse's own message
        # would name the top-level program).
        args.subcommand_parser.error(f"unrecognized arguments: {' '.join(unrecognized)}")
    return args


def _rewrite_command(args: argparse.Namespace) -> int:
    if is_package(args.input):
        return _package_command(args)
    if same_file(args.input, args.output) and not args.in_place:
        raise _UsageError(f"{args.output} is the input; pass --in-place to replace it")
    if args.in_place and args.output.is_symlink():
        # Renaming onto the link would replace the link and leave the model it names as it
        # was; writing through it would change a file elsewhere, such as a Hugging Face
        # cache blob named after the hash of its bytes (and shared by other snapshots).
        raise _UsageError(
            f"{args.output} is a symbolic link to {os.path.realpath(args.output)}; "
            "--in-place replaces a regular file only: rewrite that file, or choose another OUTPUT"
        )
    # Refuse an unusable destination before the (possibly long) load, rewrite and probe.
    check_destination(args.output)
    weights = args.output.with_name(external_data_name(args.output))
    _check_report_path(args.report, args.input, args.output, weights)
    model, report = _rewritten(args, load_model(args.input))
    console = _Console(args)
    result = _write_verified(args, model, report, args.input, args.output, console)
    try:
        _write_report(args.report, report.to_dict())
        console.done(report, result)
        console.say(f"wrote {args.output}")
    except Interrupted as interruption:
        interruption.written = args.output
        raise
    return EXIT_OK


def _package_command(args: argparse.Namespace) -> int:
    """IN is an onnxruntime-genai package: rewrite its decoder into a new folder OUT, copy
    the rest, update genai_config.json and prove the package with onnxruntime-genai."""
    if args.in_place:
        raise _UsageError(f"{args.input} is a package: it is written to a new folder, not in place")
    check_package_destination(args.input, args.output)
    _check_report_path(args.report, args.input, args.output)
    config = read_config(args.input)
    model_path = decoder_path(args.input, config)
    original = load_model(model_path)
    model, report = _rewritten(args, load_model(model_path), package=True)
    console = _Console(args)
    with staged_folder(args.output) as staged:
        copy_package(args.input, staged, original, model_path)
        staged_model = staged / model_path.relative_to(args.input)
        result = _write_verified(args, model, report, model_path, staged_model, console)
        why_not = None
        if args.no_verify:
            why_not = "--no-verify"
        elif not report.rewrites:
            why_not = _NOTHING_REWRITTEN
        try:
            package = finish_package(
                args.input,
                staged,
                config,
                original,
                model,
                verify=why_not,
                progress=console.progress,
            )
        except GenerationFailed as error:
            package = PackageResult(skipped=str(error))
            report.package = package.to_dict()
            report.package["generation"]["passed"] = False
            _write_report(args.report, report.to_dict())
            print(f"verification FAILED; nothing written: {error}", file=sys.stderr)
            raise _VerificationFailed from None
        report.package = package.to_dict()
        if not package.passed:
            _write_report(args.report, report.to_dict())
            print(report.summary(per_rewrite=args.verbose), file=sys.stderr)
            print("genai generation FAILED; nothing written:", file=sys.stderr)
            print("\n".join(package.lines()), file=sys.stderr)
            raise _VerificationFailed
    try:
        _write_report(args.report, report.to_dict())
        console.done(report, result)
        for line in package.lines():
            console.say(line)
        console.say(f"wrote {args.output}")
    except Interrupted as interruption:
        interruption.written = args.output
        raise
    return EXIT_OK


def _rewritten(
    args: argparse.Namespace, model: ir.Model, *, package: bool = False
) -> tuple[ir.Model, RewriteReport]:
    speed_probe, choose_speed = None, None
    if package and args.speed == "auto" and args.form == "auto":
        from rewriter.speed import SpeedProbe

        speed_probe = SpeedProbe(args.provider, progress=None if args.quiet else _rewrite_progress)
        choose_speed = PackageSpeed(
            speed_probe, export_convention=keeps_export_convention(model, args.provider)
        )
    model, report = rewrite(
        model,
        layers=args.layers,
        form=args.form,
        provider=args.provider,
        force=args.force,
        exact_padding=args.exact_padding,
        window_slice=args.window_slice,
        speed=args.speed,
        choose_speed=choose_speed,
        progress=None if args.quiet else _rewrite_progress,
    )
    if speed_probe is not None:
        # What the probe chose (own-cache layers it did not choose for: GENAI_OWN_CACHE,
        # named in each rewrite's speed_reason).
        report.speed = {"provider": args.provider, "layers": speed_probe.tables()}
    return model, report


def _write_verified(
    args: argparse.Namespace,
    model: ir.Model,
    report: RewriteReport,
    source: Path,
    output: Path,
    console: _Console,
) -> VerificationResult | None:
    """Stage `model` at `output`, verify it against `source`, publish it when it passed
    (_VerificationFailed, nothing written, when it did not); the result, None when not run."""
    from rewriter.verification import VerificationError, verify

    result = None
    with staged_output(model, output, source=source) as staged:
        if args.no_verify:
            report.verification = {"skipped": "--no-verify"}
        elif not report.rewrites:
            # Nothing to prove: the graph is the input's (plus metadata), and a model the
            # verifier cannot feed must still come out as an unchanged copy.
            report.verification = {"skipped": _NOTHING_REWRITTEN}
        else:
            try:
                result = verify(
                    source,
                    staged,
                    provider=args.provider,
                    progress=console.progress,
                    mode=args.verify_mode,
                )
            except VerificationError as error:
                raise InputError(f"verification could not run: {error}") from None
            report.verification = result.to_dict()
            if result.passed:
                record_verification(staged, report.verification)
            if not result.passed:
                _write_report(args.report, report.to_dict())
                console.failed(report, result)
                raise _VerificationFailed
    return result


class _Console:
    """Where and how much the CLI prints: the default view (``rewriter.console``), every
    check with ``--verbose``, errors only with ``--quiet``; to standard error when the
    report goes to standard output (``--report -``)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._quiet = args.quiet
        self._verbose = getattr(args, "verbose", False)
        self._stream = sys.stderr if _to_stdout(args.report) else sys.stdout

    def say(self, text: str) -> None:
        if not self._quiet:
            print(text, file=self._stream)

    def progress(self, message: str) -> None:
        # Sub-steps (indented: a layer's scenarios and cases) only with --verbose.
        if self._quiet or (message.startswith(" ") and not self._verbose):
            return
        print(f"  verifying: {message}", file=sys.stderr, flush=True)

    def done(self, report: RewriteReport, result: VerificationResult | None) -> None:
        if result is None:
            self.say(report.summary())
            if report.verification:
                self.say(f"verification skipped ({report.verification['skipped']})")
            return
        if self._verbose:
            self.say(report.summary())
            self.say(result.summary())
        else:
            self.say(report.summary(per_rewrite=False))
            self.say(verification_console(report, result))

    def failed(self, report: RewriteReport, result: VerificationResult) -> None:
        print(report.summary(per_rewrite=self._verbose), file=sys.stderr)
        print("verification FAILED; nothing written:", file=sys.stderr)
        details = result.summary() if self._verbose else verification_console(report, result)
        print(details, file=sys.stderr)


def _verify_command(args: argparse.Namespace) -> int:
    from rewriter.verification import VerificationError, verify

    decode = tuple(args.decode or ())
    _check_report_path(args.report, args.original, args.candidate, *decode)
    for path in (args.original, args.candidate, *decode):
        load_model(path)  # clear one-line errors for unreadable files
    if decode:
        return _verify_pair_command(args)
    console = _Console(args)
    try:
        result = verify(
            args.original,
            args.candidate,
            provider=args.provider,
            progress=console.progress,
            mode=args.verify_mode,
        )
    except VerificationError as error:
        raise InputError(str(error)) from None
    _write_report(args.report, {"verification": result.to_dict()})
    text = result.summary() if args.verbose else verification_console(RewriteReport(""), result)
    if not args.quiet or not result.passed:
        print(
            text, file=sys.stdout if result.passed and not _to_stdout(args.report) else sys.stderr
        )
    return EXIT_OK if result.passed else EXIT_VERIFY_FAILED


def _verify_pair_command(args: argparse.Namespace) -> int:
    from rewriter.verification import VerificationError, verify_pair

    original_decode, candidate_decode = args.decode
    try:
        result = verify_pair(
            (str(args.original), str(original_decode)),
            (str(args.candidate), str(candidate_decode)),
            provider=args.provider,
        )
    except VerificationError as error:
        raise InputError(str(error)) from None
    checks = [
        {
            "name": check.name,
            "model": check.model,
            "passed": check.passed,
            "max_abs_diff": check.max_abs_diff,
        }
        for check in result.checks
    ]
    _write_report(args.report, {"verification": {"passed": result.passed, "checks": checks}})
    print(result.summary(), file=sys.stdout if result.passed else sys.stderr)
    return EXIT_OK if result.passed else EXIT_VERIFY_FAILED


def _probe_command(args: argparse.Namespace) -> int:
    try:
        result = probe(args.provider, dtypes=args.dtypes, head_sizes=args.head_sizes)
    except ValueError as error:
        raise _UsageError(str(error)) from None
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return EXIT_OK


def _rewrite_progress(message: str) -> None:
    print(f"  rewriting: {message}", file=sys.stderr, flush=True)


def _to_stdout(report: Path | None) -> bool:
    return report is not None and str(report) == "-"


def _check_report_path(report: Path | None, *models: Path) -> None:
    """The report must be writable and must not land on a model file (or its weights)."""
    if report is None or _to_stdout(report):
        return
    check_destination(report)
    for model in models:
        if same_file(model, report) or report.resolve() == model.resolve():
            raise _UsageError(f"--report {report} would overwrite {model}")


def _write_report(path: Path | None, data: dict) -> None:
    if path is None:
        return
    if _to_stdout(path):
        print(json.dumps(data, indent=2), flush=True)
        return
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(temporary, path)
    except OSError as error:
        raise OutputError(f"{path}: cannot write report ({error.strerror})") from None
    finally:
        temporary.unlink(missing_ok=True)
