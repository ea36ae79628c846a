"""Data: code files, audio → Mimi codes (with an on-disk cache), manifests, Moshi's stream layout."""

FRAME_RATE = 12.5  # Mimi frames per second (one Moshi step = 80 ms): the one definition, light to import
CODES_CACHE = ".cache/codes"  # default folder of the content-addressed Mimi codes cache (every app's)
