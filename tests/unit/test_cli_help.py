"""Every command and sub-command of `unitoken` shows an example of itself in --help."""

import argparse
import re

from unitoken.cli import build_parser


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, parser) of every command and sub-command under ``parser``, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield (*path, name), child
                yield from _commands(child, (*path, name))


def test_every_command_help_has_an_example_of_itself():
    """One in-process walk of the parser (no subprocess): each --help has an "Example(s):"
    section with a `unitoken <command path> ...` line, and that line parses when it is a leaf."""
    commands = dict(_commands(build_parser()))
    assert {("registry", "promote"), ("pipeline", "schedule"), ("data", "validate"), ("train",)} <= set(commands)
    for path, parser in commands.items():
        text = parser.format_help()
        section = re.search(r"^Examples?:\n((?:  .*\n?)+)", text, re.M)
        assert section, f"unitoken {' '.join(path)} --help has no Example section"
        lines = [line.strip() for line in section.group(1).splitlines()]
        prefix = "unitoken " + " ".join(path)
        mine = [line for line in lines if line == prefix or line.startswith(prefix + " ")]
        assert mine, f"unitoken {' '.join(path)} --help: no example starts with `{prefix}`: {lines}"


def test_examples_parse():
    """The examples of the leaf commands are valid command lines (quotes as a shell reads them)."""
    import shlex

    parser = build_parser()
    for path, child in _commands(parser):
        if any(isinstance(a, argparse._SubParsersAction) for a in child._actions):
            continue
        for line in re.search(r"^Examples?:\n((?:  .*\n?)+)", child.format_help(), re.M).group(1).splitlines():
            argv = shlex.split(line.split("   #")[0], comments=False)[1:]
            args = parser.parse_args(argv)
            assert callable(args.handler), line
