"""Long-context evaluation app (docs/evaluation.md; its structure: docs/architecture.md §12).

pipeline.py (plan → build → load streams → probe → write) · plan.py (EvalPlan, the models) ·
config.py (EvalConfig) · books.py / streams.py (LibriLight and manifest streams) · nll.py (chunked
and native per-position NLL) · the probes: librilight.py, length_gen.py, memory_probe.py,
zero_shot.py (its datasets: zero_shot_data.py, zero_shot_fixture.py), continuation.py (its span scorer:
continuation_scorer.py; its report: continuation_report.py; its metrics: continuation_metrics.py;
its ASR, speaker and text models: judges.py) · report.py (librilight's
report, Markdown) · plots.py · metrics.py · writers.py (one writer per output kind) ·
alignment.py · fast_weights.py · memory.py (peak memory) · fixture.py · cli.py.
"""
