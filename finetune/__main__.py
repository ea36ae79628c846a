"""`python -m ttt_speech_apps.finetune CONFIG.yaml [KEY=VALUE ...]`, e.g. under torchrun."""
import sys

from .cli import main

sys.exit(main())
