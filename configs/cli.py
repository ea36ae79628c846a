"""`ttt-speech config list` and `ttt-speech config cp NAME DEST` (torchtune's `tune ls` / `tune cp`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ttt_speech.files import writable_file, write_text_atomic

from . import find_packaged, packaged_configs, packaged_names


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("config", help="list the shipped configs, or copy one to start your own",
                            description="The YAML configs shipped with ttt-speech. Every command that takes a "
                                        "config also takes one of these names (e.g. `ttt-speech train tiny`).")
    tools = parser.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    listing = tools.add_parser("list", help="name, command and description of every shipped config",
                               description="List the shipped configs.")
    listing.set_defaults(func=_list)
    copy = tools.add_parser("cp", help="copy a shipped config to a file or folder",
                            description="Copy a shipped config (to edit it); an existing file is kept unless --force.")
    copy.add_argument("name", help="a shipped config (e.g. tiny or tiny.yaml; see `ttt-speech config list`)")
    copy.add_argument("dest", type=Path, help="file to write, or an existing folder to copy into")
    copy.add_argument("--force", action="store_true", help="replace DEST when it exists")
    copy.set_defaults(func=_copy)


def _list(args: argparse.Namespace) -> int:
    configs = packaged_configs()
    width = max(len(c.name) for c in configs)
    command_width = max(len(c.command) for c in configs)
    for c in configs:
        print(f"{c.name:<{width}}  {c.command:<{command_width}}  {c.description}")
    return 0


def _copy(args: argparse.Namespace) -> int:
    packaged = find_packaged(args.name)
    if packaged is None:
        raise ValueError(f"NAME: no packaged config {args.name!r} (packaged: {packaged_names()})")
    dest = args.dest / packaged.name if args.dest.is_dir() else args.dest
    if not dest.parent.is_dir():  # (checked first: writable_file would create it)
        raise ValueError(f"DEST: the folder {dest.parent} does not exist")
    writable_file(dest, "DEST")  # a folder in the way, a read-only folder: one line, nothing written
    if dest.exists() and not args.force:
        raise ValueError(f"DEST: {dest} exists; pass --force to replace it")
    write_text_atomic(dest, packaged.path.read_text())
    print(f"copied {packaged.name} to {dest}")
    return 0
