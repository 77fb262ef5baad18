"""The ``cmamba`` command line.

Each sub-command lives in its own module under ``service.commands`` exposing
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only when their
command runs, so ``cmamba --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from service import __version__

COMMANDS: dict[str, str] = {
    "serve": "serve the REST API (uvicorn)",
    "predict": "predict the sentiment of a media file, locally or against a running server",
    "stream": "play a media file to a running server's live stream and print the updates",
    "extract": "build a training dataset (MMSA pickle layout) from a CSV of labelled media",
    "train": "train a Coupled Mamba checkpoint",
    "evaluate": "evaluate a checkpoint on a dataset or on rated texts",
    "bench": "run a benchmark script and print its table",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every optional argument's help ends with its default (``none`` when it has none), unless
    the help already says it; required ones have no default to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or "default" in (action.help or "").lower():
            return action.help
        help_text = super()._get_help_string(action)
        if help_text is not None and action.default is None:
            help_text = help_text.replace("%(default)s)", "none)")
        return help_text


def _command_module(name: str):  # type: ignore[no-untyped-def]
    return importlib.import_module(f"service.commands.{name}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Build the parser; only ``command``'s module is imported (all of them when None)."""
    parser = argparse.ArgumentParser(
        prog="cmamba", description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub_parser = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=HelpFormatter
        )
        if command is None or command == name:
            _command_module(name).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else "")
    args = parser.parse_args(argv)
    importlib.import_module("service.logging_setup").configure_cli_logging()
    sys.exit(_command_module(args.command).run(args))


if __name__ == "__main__":
    main()
