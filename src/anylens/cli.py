"""The ``anylens`` command line.

Every subcommand is one entry of :data:`COMMANDS`: a help line, a function that adds its
arguments to an argparse parser, and a function that runs it and returns the exit status.
A subcommand that lives in its own module is added with :func:`module_command`; one that parses
its own arguments (like ``zoo``) sets ``forward`` and receives the raw argument list.

Exit status: 0 success, 1 the command ran and found a failure (``check``), 2 a usage or load
error, reported on stderr in one line, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with the command line or with the model it names (exit status 2)."""


@dataclass(frozen=True)
class Command:
    help: str
    setup: Callable[[argparse.ArgumentParser], None] | None = None
    run: Callable[[argparse.Namespace], int] | None = None
    #: Parses its own arguments: receives the raw list after the command name.
    forward: Callable[[list[str]], int] | None = None


def module_command(module: str, help: str) -> Command:
    """A subcommand implemented in ``module`` by ``add_arguments(parser)`` and ``run(args) -> int``.

    The module is imported when the parser is built; keep heavy imports inside its ``run``.
    """

    def setup(parser: argparse.ArgumentParser) -> None:
        importlib.import_module(module).add_arguments(parser)

    def run(args: argparse.Namespace) -> int:
        return int(importlib.import_module(module).run(args) or 0)

    return Command(help, setup, run)


# -- loading a MODEL argument --------------------------------------------------------------------
MODEL_HELP = "zoo:NAME, tiny:FAMILY (a tiny random model), a model directory, a .gguf file, or a hub id"


def load_model(source: str) -> Any:
    """The model a command line names, or a :class:`UsageError` saying why it cannot be loaded."""
    from .loading import load

    try:
        return load(source)
    except Exception as error:  # whatever the loaders raise, the user gets one clear line
        raise UsageError(f"cannot load {source!r}: {_one_line(error)}") from None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# -- anylens table -------------------------------------------------------------------------------
def _table_setup(parser: argparse.ArgumentParser) -> None:
    from .registry.table import FORMATS

    parser.add_argument(
        "--format",
        choices=FORMATS,
        help="output format (default: markdown, or text with --adapters: the adapters side by side)",
    )
    parser.add_argument(
        "--adapters",
        metavar="NAMES",
        help="only these adapters, comma-separated adapter or architecture names (e.g. llama,mamba,gpt2)",
    )
    parser.add_argument("--write", metavar="PATH", type=Path, help="write to PATH instead of printing")
    parser.add_argument("--builtin", action="store_true", help="built-in adapters only")
    parser.add_argument(
        "--infer",
        nargs="+",
        metavar="CLASS",
        default=[],
        help="also infer adapters for these transformers classes (tiny random instances) and list them as inferred",
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="exactly docs/reference.md: the table with its explanation (built-ins and inferred examples)",
    )


def _table_run(args: argparse.Namespace) -> int:
    from .core.errors import UnknownArchitectureError
    from .registry.table import inferred_rows, reference_markdown, render, select_rows, table_rows

    rows = table_rows(builtin_only=args.builtin) + inferred_rows(args.infer)
    if args.adapters is not None:
        if not args.adapters.strip(" ,"):
            raise UsageError("--adapters needs at least one adapter or architecture name, e.g. --adapters llama,gpt2")
        try:
            rows = select_rows(rows, [name for name in args.adapters.split(",") if name.strip()])
        except UnknownArchitectureError as error:
            raise UsageError(f"--adapters: {error}") from None
    fmt = args.format or ("text" if args.adapters is not None else "markdown")
    text = reference_markdown() if args.reference else render(rows, fmt)
    if args.write is None:
        sys.stdout.write(text)
        return EXIT_OK
    try:
        args.write.write_text(text, encoding="utf-8")
    except OSError as error:
        raise UsageError(f"cannot write {args.write}: {_one_line(error)}") from None
    print(f"wrote {args.write} ({len(rows)} rows)", file=sys.stderr)
    return EXIT_OK


# -- anylens check -------------------------------------------------------------------------------
def _check_setup(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("--prompt", metavar="TEXT", help="check on this text (default: two random token sequences)")
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="precision to run the model in; tolerances scale with its epsilon (default: float32)",
    )


def _check_run(args: argparse.Namespace) -> int:
    import torch

    from .registry.verify import check

    model = load_model(args.model)
    # Parameters only, as loading with a dtype does: buffers such as rotary frequencies stay float32.
    for parameter in model.hf.parameters():
        if parameter.is_floating_point():
            parameter.data = parameter.data.to(getattr(torch, args.dtype))
    inputs = None
    if args.prompt is not None:
        try:
            inputs = model.to_tokens(args.prompt)["input_ids"].to(model.device)
        except Exception as error:
            raise UsageError(f"cannot tokenize --prompt: {_one_line(error)}") from None
    report = check(model, inputs)
    print(report)
    return EXIT_OK if report.passed else EXIT_FAILED


# -- anylens roles -------------------------------------------------------------------------------
def _roles_setup(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name", metavar="NAME", help=f"an adapter (llama), an architecture (LlamaForCausalLM), or a model: {MODEL_HELP}"
    )


def _looks_like_model_source(name: str) -> bool:
    """A zoo:/tiny: name, a hub id ORG/NAME, a .gguf file or an existing path (not an adapter name)."""
    return ":" in name or "/" in name or "\\" in name or name.endswith(".gguf") or Path(name).exists()


def _roles_run(args: argparse.Namespace) -> int:
    from .core.errors import UnknownArchitectureError
    from .registry.table import select_rows, table_rows, unknown_name_message

    rows = table_rows()
    try:
        chosen = select_rows(rows, [args.name])
    except UnknownArchitectureError:
        if not _looks_like_model_source(args.name):
            raise UsageError(f"{unknown_name_message(args.name, rows)}; or name a model: {MODEL_HELP}") from None
        model = load_model(args.name)
        print(f"model: {model.name}")
        print(f"adapter: {model.adapter.name} ({', '.join(model.adapter.architectures)}), {model.n_layers} layers")
        _print_roles(model.adapter.roles, model.adapter.reference_modules)
        return EXIT_OK
    base, *variants = chosen
    print(f"adapter: {base.adapter} ({', '.join(base.architectures)}), {base.source}")
    _print_roles(base.roles, base.reference_modules)
    for variant in variants:
        dropped = [role for role in base.roles if role not in variant.roles]
        changed = [role for role in variant.roles if variant.roles[role] != base.roles.get(role)]
        facts = [f"{fact}={variant.cells()[fact]}" for fact in ("parallel", "z_feeds_residual", "soft_cap")]
        facts = [fact for fact in facts if variant.cells()[fact.split("=")[0]] != base.cells()[fact.split("=")[0]]]
        summary = [f"without {', '.join(dropped)}"] if dropped else []
        summary += [f"{role} -> {variant.roles[role]}" for role in changed] + facts
        print(f"variant {variant.variant}: {'; '.join(summary) or 'the same roles'}")
    return EXIT_OK


def _print_roles(roles: Any, reference_modules: Any) -> None:
    """``role -> path  TransformerLens name`` per role, the paths into a forward in words, and the
    adapter's reference modules."""
    from .core.roles import ALL_ROLES
    from .registry.compact import describe_path, hook_name_cell

    present = [role for role in ALL_ROLES if role in roles]
    width = max(len(role) for role in present)
    # Aligned on the usual paths; the long paths into a forward just push their name along.
    path_width = max(len(roles[role]) for role in present if ".source." not in roles[role])
    for role in present:
        hook = hook_name_cell(role)
        hook = f"blocks.{{i}}.{hook}" if hook and "{i}" in roles[role] else hook
        print(f"  {role:<{width}} -> {roles[role]:<{path_width}}  {hook}".rstrip())
    for role in present:
        if ".source." in roles[role]:
            print(f"{role}: {describe_path(roles[role])}")
    if reference_modules:
        print("modules (for reference; no role reads them):")
        name_width = max(len(name) for name in reference_modules)
        for name, path in reference_modules.items():
            print(f"  {name:<{name_width}} -> {path}")


# -- anylens zoo ---------------------------------------------------------------------------------
def _zoo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anylens zoo", description="The tiny trained models shipped with anylens.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("train", help="train the zoo models; arguments go to python -m anylens.zoo.train")
    return parser


def _zoo_forward(argv: list[str]) -> int:
    if argv[:1] == ["train"]:
        # Imported only here: training pulls in the corpus and its tokenizer.
        from .zoo import train

        return _exit_code(lambda: train.main(argv[1:]))

    def explain() -> int:  # --help, or anything but 'train': argparse reports it and exits
        _zoo_parser().parse_args(argv)
        return EXIT_USAGE

    return _exit_code(explain)


COMMANDS: dict[str, Command] = {
    "table": Command("print the role x architecture reference table", _table_setup, _table_run),
    "check": Command("verify an adapter's invariants on a model", _check_setup, _check_run),
    "roles": Command(
        "show which module plays each role: of an adapter, an architecture or a model", _roles_setup, _roles_run
    ),
    "zoo": Command("the tiny trained models: anylens zoo train [...]", forward=_zoo_forward),
    "run": module_command("anylens.sweep.cli", "run one experiment across models and prompts, resumable on disk"),
    "infer": module_command("anylens.inference.infer", "infer and verify an adapter for a model; print it as TOML"),
    "demo": module_command("anylens.demo", "compare the zoo architectures: experiments, table, HTML report"),
}


# -- entry point ---------------------------------------------------------------------------------
def version_line() -> str:
    """``anylens X (transformers Y, nnsight Z, torch W)``: what a bug report needs first."""
    from . import __version__
    from .registry.table import versions

    found = versions()
    stack = ", ".join(f"{package} {found[package]}" for package in ("transformers", "nnsight", "torch"))
    return f"anylens {__version__} ({stack})"


class _VersionAction(argparse.Action):
    """``--version``, computed only when asked for (it reads installed package metadata)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anylens", description="Mechanistic interpretability on any architecture, through component roles."
    )
    parser.add_argument(
        "--version", action=_VersionAction, help="print the versions of anylens and its stack, then exit"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        # A forwarding command is dispatched before parsing; it is listed here for --help only.
        sub = commands.add_parser(name, help=command.help, description=command.help, add_help=not command.forward)
        if command.setup is not None:
            command.setup(sub)
        sub.set_defaults(run=command.run)
    return parser


def _exit_code(call: Callable[[], Any]) -> int:
    """Run ``call``, turning argparse's ``SystemExit`` into a returned status."""
    try:
        return int(call() or 0)
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or EXIT_OK
        print(stop.code, file=sys.stderr)  # sys.exit("message"): the message is the report
        return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS and COMMANDS[argv[0]].forward is not None:
        return COMMANDS[argv[0]].forward(argv[1:])
    parser = build_parser()
    args: argparse.Namespace | None = None

    def parse() -> int:
        nonlocal args
        args = parser.parse_args(argv)
        return EXIT_OK

    status = _exit_code(parse)
    if args is None:  # --help, or a usage error argparse has already reported
        return status
    try:
        return args.run(args)
    except UsageError as error:
        print(f"anylens {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
