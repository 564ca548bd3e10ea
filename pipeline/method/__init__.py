"""The HONES method: ``heads`` (critical heads), ``dump`` / ``store`` (activations), ``attribution``,
``ablation`` (ground truth), ``masks``, ``distributed`` (multi-rank dumps, dask attribution)."""
