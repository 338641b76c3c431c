"""Write docs/cli.md: every flag of every ``paadet`` command, generated from the parsers themselves.

Usage: ``python tools/gen_cli_docs.py`` (rewrites docs/cli.md) or ``python tools/gen_cli_docs.py --check`` (exit 1 when
the file is stale; ``test_cli_reference_is_up_to_date`` in ``tests/test_layout.py`` runs that check). The help texts
are argparse's, so the page is what ``paadet COMMAND --help`` prints, in tables.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from paadet.cli import COMMANDS, build_parser

OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
WIDTH = 100


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    names = ", ".join(f"`{name}`" for name in action.option_strings)
    takes_value = action.nargs != 0
    if takes_value:
        metavar = action.metavar or (
            "{" + ",".join(map(str, action.choices)) + "}" if action.choices else action.dest.upper()
        )
        names += f" `{metavar}`" if action.nargs != "?" else f" `[{metavar}]`"
    return names.replace("|", "\\|")  # a metavar such as FILE|NAME must not end the table cell


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    text = action.help or ""
    if isinstance(action, argparse._SubParsersAction) and not text:  # the kinds, each with its own section below
        text = "one of: " + ", ".join(f"`{name}`" for name in action.choices)
    if "%(" in text:
        text = text % {**vars(action), "prog": parser.prog, "default": action.default}
    return " ".join(text.replace("%%", "%").split()).replace("|", "\\|")


def command_section(
    name: str, parser: argparse.ArgumentParser, summary: str | None = None, level: int = 2
) -> list[str]:
    """The section of one command: its description, its usage, a table per argument group, then a sub-section per
    sub-command (``paadet data synthetic``)."""
    lines = ["#" * level + f" `paadet {name}`", "", f"{COMMANDS[name] if summary is None else summary}.", ""]
    if parser.description:
        lines += [" ".join(parser.description.split()), ""]
    formatter = argparse.HelpFormatter(prog=parser.prog, width=WIDTH)  # not the terminal's width: reproducible
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    usage = formatter.format_help().strip()
    lines += ["```text", usage, "```", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        title = {"positional arguments": "arguments", "options": "options"}.get(group.title, group.title)
        lines += [f"**{title}**", "", "| flag | what it does |", "|---|---|"]
        lines += [f"| {_flags(a)} | {_help(parser, a)} |" for a in actions]
        lines.append("")
    if parser.epilog:
        lines += [" ".join(parser.epilog.split()), ""]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for kind, child in action.choices.items():
                lines += command_section(f"{name} {kind}", child, helps.get(kind, ""), level + 1)
    return lines


def render() -> str:
    """The whole page."""
    root = build_parser()
    sub = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
    lines = [
        "# Command-line reference",
        "",
        "Every flag of every command, generated from the parsers by `python tools/gen_cli_docs.py` (a test fails",
        "when this page is stale). `paadet COMMAND --help` prints the same. Exit status: 0 done, 1 done with",
        "skipped inputs (unreadable files), 2 a one-line error before or during the work, 130 interrupted (Ctrl-C).",
        "",
        "| command | what it does |",
        "|---|---|",
        *[f"| [`paadet {name}`](#paadet-{name}) | {summary} |" for name, summary in COMMANDS.items()],
        "",
    ]
    for name in COMMANDS:
        lines += command_section(name, sub.choices[name])
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write docs/cli.md from paadet's parsers.")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when docs/cli.md differs from what would be written"
    )
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.is_file() or OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{OUTPUT} is stale: run python tools/gen_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
