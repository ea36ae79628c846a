"""Commands of the form `CONFIG [KEY=VALUE ...]` with options anywhere (`CONFIG --quiet k=v`, `CONFIG k=v --quiet`).

argparse stops reading options at a positional of `nargs=argparse.REMAINDER` (which the overrides
must be, or it could not take positionals after options), so options given after the config land
among the overrides. `overrides_and_options` hands them back to the command's own parser.
"""
from __future__ import annotations

import argparse


def overrides_and_options(parser: argparse.ArgumentParser, args: argparse.Namespace,
                          positionals: tuple[str, ...] = ("config",)) -> list[str]:
    """The KEY=VALUE overrides of `args.overrides`; every other token there (options and their
    values) is parsed by `parser` into `args`, before the positionals named so that REMAINDER stays
    empty. An unknown option or a bad value is a ValueError (the command's one-line error, exit 2)."""
    overrides, rest = [], []
    tokens = list(args.overrides)
    while tokens:
        token = tokens.pop(0)
        if not token.startswith("-"):
            overrides.append(token)  # a bare word too: `apply_overrides` names it as a bad override
            continue
        rest.append(token)
        if "=" not in token and _takes_value(parser, token) and tokens:
            rest.append(tokens.pop(0))  # its value, whatever it looks like (`--resume runs/lr=3e-4`)
    if rest:
        given = [str(getattr(args, name)) for name in positionals if getattr(args, name, None) is not None]
        parser.error = _raise  # one line through the command's error path, not usage + SystemExit
        try:
            parser.parse_args([*rest, *given], namespace=args)
        finally:
            del parser.error  # back to ArgumentParser.error
    args.overrides = overrides
    return overrides


def _takes_value(parser: argparse.ArgumentParser, option: str) -> bool:
    """Whether `option` is one of `parser`'s options that take a value (not a flag)."""
    # argparse (stdlib) has no public accessor of a parser's actions; `_actions` has held them since 3.2
    return any(option in action.option_strings and action.nargs != 0 for action in parser._actions)


def _raise(message: str) -> None:
    raise ValueError(message)
