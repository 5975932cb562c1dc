"""What stages are built from: the job (a config resolved once: layout, mesh, tokenizer, data,
model specs), the workspace (the workdir's layout, done-markers, lock), the data and model
loading, the training loop, the inference loop, text scoring and plots. Imports runtime, core,
models, data and config."""
