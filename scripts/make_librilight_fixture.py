#!/usr/bin/env python
"""Build a small LibriLight-layout tree from Debian's pocketsphinx-testdata (see eval/fixture.py)."""
import sys

from ttt_speech_apps.eval.fixture import main

if __name__ == "__main__":
    sys.exit(main())
