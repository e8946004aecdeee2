"""Router training: the run config, the loop, its metrics stream, router checkpoints, the calibrated budgets, the
step benchmark (the end-of-training report is evaluation/training_report.py, passed to the loop)."""
