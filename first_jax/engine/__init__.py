"""What stages are built from: the workspace (a run's layout, mesh, data, models), the
training loop, the inference loop, text scoring and plots. Imports runtime, core, models, data
and config."""
