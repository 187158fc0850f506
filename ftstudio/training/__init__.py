"""What runs inside the trainer process: the recipe, data, batches, models, adapters, progress,
evaluation and export. It imports nothing of the studio, the web, the CLI or execution."""
