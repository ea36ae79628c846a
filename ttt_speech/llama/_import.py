"""Import transformers (the `omni` extra) with an actionable message when it is missing or too old."""
try:
    import transformers
except ImportError as e:  # pragma: no cover - exercised only on installs without the extra
    raise ImportError(
        "ttt_speech.llama needs transformers 5.x: `pip install -c constraints.txt -e '.[omni]'` "
        "(or `pip install 'ttt-speech[omni]'`)"
    ) from e

if int(transformers.__version__.split(".")[0]) < 5:  # pragma: no cover
    raise ImportError(
        f"ttt_speech.llama needs transformers 5.x (its Cache API), found {transformers.__version__}; "
        "the LLaMA-Omni pin 4.43 is not supported"
    )
