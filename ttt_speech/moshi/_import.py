"""Import moshi with an actionable message when it is missing."""
try:
    import moshi  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "ttt_speech.moshi needs moshi==0.2.13, installed without its stale pins: "
        "`pip install --no-deps moshi==0.2.13` (see README, 'Installation')"
    ) from e
