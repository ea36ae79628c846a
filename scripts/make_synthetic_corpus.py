#!/usr/bin/env python
"""Write the synthetic long-context corpus (same as `ttt-speech data synth`)."""
import sys

from ttt_speech.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "synth", *sys.argv[1:]]))
