"""The activation store and the attribution array: the only package that knows their layout
(docs/store.md).

Map of this package (each module imports only those above it):
- ``io``: ``StoreError`` and checksummed Zarr I/O: ``create_checked_array`` (how every array is
  created), ``open_finished_group`` and ``read_checked`` (how every finished group is opened
  and read).
- ``layout``: ``StoreLayout`` (sizes, chunking and write blocks of one store, ``plan``), the
  per-item arrays (``ITEM_ARRAYS``), ``scratch_path``, and the disk check ``check_free_space``.
- ``activations``: ``ActivationStore`` (``create_or_resume`` / ``write_block`` / ``finalize``,
  ``open`` / ``iter_blocks``), ``ItemArrays``, ``StoreIndex``; its docstring holds the table of
  the store's arrays.
- ``importance``: ``write_importance`` / ``read_importance`` / ``read_importance_on_ablation_items``,
  the attribution array [method, task, layer, neuron].
- ``verification``: ``verify`` (a ``StoreCheck`` of one store, every chunk read).

The names below are those the rest of the project imports from ``pipeline.method.store``.
"""

from pipeline.method.store.activations import ActivationStore, ItemArrays, StoreIndex
from pipeline.method.store.importance import read_importance, read_importance_on_ablation_items, write_importance
from pipeline.method.store.io import StoreError, create_checked_array
from pipeline.method.store.layout import (
    DONE_DIR,
    ITEM_ARRAYS,
    StoreLayout,
    check_free_space,
    human_bytes,
    item_array_dtype,
    scratch_path,
)
from pipeline.method.store.verification import StoreCheck, verify

__all__ = [
    "DONE_DIR",
    "ITEM_ARRAYS",
    "ActivationStore",
    "ItemArrays",
    "StoreCheck",
    "StoreError",
    "StoreIndex",
    "StoreLayout",
    "check_free_space",
    "create_checked_array",
    "human_bytes",
    "item_array_dtype",
    "read_importance",
    "read_importance_on_ablation_items",
    "scratch_path",
    "verify",
    "write_importance",
]
