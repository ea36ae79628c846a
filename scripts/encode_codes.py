#!/usr/bin/env python
"""Encode a manifest's audio to Mimi codes ahead of training (same as `ttt-speech data encode`)."""
import sys

from ttt_speech.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "encode", *sys.argv[1:]]))
