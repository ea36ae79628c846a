"""Data: code files, audio → Mimi codes (with an on-disk cache), manifests, Moshi's stream layout."""
