"""`ttt-speech generate` app: continue audio prompts with a (TTT-patched) Moshi (docs/generate.md)."""
