"""Streaming generation with moshi's `LMGen.step`: sampling, sessions, saved state, audio decoding.

The public entry point is `ttt_speech.generate` (one module re-exporting what users need).
"""
