"""The report: ``study`` (gathers the stages' results, the verdict rows and the metrics files),
``verdict`` (the verdict table's claims and counts), ``document`` (the report's sections),
``plots`` (PNG figures), ``html`` (the self-contained report) and ``markdown`` (its tables)."""
