"""Long-context evaluation app (docs/evaluation.md, docs/architecture.md §8): LibriLight books,
chunked vs native NLL, length generalisation.

config.py (EvalConfig) · books.py (LibriLight discovery, chapter concatenation) · nll.py (chunked and
native per-position NLL) · metrics.py · alignment.py · fast_weights.py · memory.py · report.py (JSON,
Markdown) · plots.py (PNG) · tracking.py (wandb) · length_gen.py · run.py (orchestration) · cli.py ·
memory_probe.py (`eval memory`: NLL of a segment before / after TTT on it).
"""
