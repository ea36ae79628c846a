"""The documentation matches the code: every command the README names exists, every option has a
help text, every config field is in a reference kept in sync with the dataclasses."""
import argparse
import importlib.util
import re
from pathlib import Path

import pytest

from ttt_speech.cli import build_parser
from ttt_speech.schema import markdown_reference

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _walk(parser: argparse.ArgumentParser, path: str = "ttt-speech"):
    yield path, parser
    for name, child in _subcommands(parser).items():
        yield from _walk(child, f"{path} {name}")


def test_every_option_of_every_command_has_a_help_text():
    for path, parser in _walk(build_parser()):
        assert parser.description or path == "ttt-speech", f"{path}: no description"
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{path}: {action.option_strings or action.dest} has no help text"


def test_commands_named_in_the_readme_exist():
    tree = {name: _subcommands(p) for name, p in _subcommands(build_parser()).items()}
    used = re.findall(r"ttt-speech ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?", README)
    assert len(used) >= 10
    for command, tool in used:
        assert command in tree, f"README: `ttt-speech {command}` is not a command"
        if tree[command] and tool:
            assert tool in tree[command], f"README: `ttt-speech {command} {tool}` is not a command"
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    for target in re.findall(r"`make ([a-z][\w-]*)`|^make ([a-z][\w-]*)", README, re.M):
        assert (target[0] or target[1]) in targets, f"README: `make {target}` is not a Makefile target"
    for path in set(re.findall(r"\b((?:scripts|configs|docs)/[\w./-]+\.(?:py|yaml|md))", README)):
        assert (ROOT / path).is_file(), f"README names {path}, which does not exist"
    for module in re.findall(r"-m ([a-z_]+(?:\.[a-z_]+)+)", README):
        assert importlib.util.find_spec(module) is not None, f"README: python -m {module} does not exist"


def test_demo_config_reference_is_in_sync():
    from ttt_speech_apps.demo.config import DemoConfig

    reference = markdown_reference(DemoConfig)
    assert reference in (ROOT / "docs/demo.md").read_text(), (
        "docs/demo.md is out of date; regenerate it with: python -c 'from ttt_speech_apps.demo.config import DemoConfig; "
        "from ttt_speech.schema import markdown_reference; print(markdown_reference(DemoConfig))'")


@pytest.mark.parametrize("name", ["demo", "tiny", "moshi_7b_ttt", "eval_tiny", "eval_librilight", "ttt_linear_hybrid",
                                  "tiny_llama", "qwen2_5_7b_ttt"])
def test_shipped_configs_are_named_in_the_docs(name):
    docs = README + "".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    assert f"configs/{name}.yaml" in docs
