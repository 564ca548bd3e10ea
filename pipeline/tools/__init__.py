"""Command-line helpers outside the pipeline graph: ``estimate`` (cost of a model before running it)."""
