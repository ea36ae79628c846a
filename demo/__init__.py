"""`ttt-speech demo`: the whole mission (corpus → TTT + baseline fine-tuning → long-context
evaluation in both modes → one comparison) on a CPU in minutes. Orchestration only."""
