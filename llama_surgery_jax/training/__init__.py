"""Router training: the run config, the loop, router checkpoints, the report, the step benchmark."""
