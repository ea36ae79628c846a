#!/usr/bin/env python
"""Build a small LibriLight-layout tree from Debian's pocketsphinx-testdata (see eval/fixture.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.fixture import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
