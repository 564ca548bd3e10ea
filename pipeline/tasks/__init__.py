"""Tasks and data: ``items`` (the table schema, prompts, target answers), ``benchmark`` (the
synthetic generator), ``coco_import`` (the paper's data), ``metrics`` (task utilities)."""
