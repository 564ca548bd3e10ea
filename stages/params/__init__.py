"""params.yaml: its schema and the typed, declared view each stage gets of it.

Map of this package:
- ``schema``: one strict pydantic model per section (``HeadsConfig``, ``DumpConfig``, ...) and
  ``ParamsFile``, the whole file, validated at every stage start; ``ConfigError`` names every
  offending key.
- ``view``: loading and validating the file (``load_params_file``, ``validate_section``), the
  read-only view of the keys a stage declares (``read_params``, ``StageParams``,
  ``declared_keys``; reading an undeclared key raises ``UndeclaredParam``), the audit of the
  keys read (``write_params_audit``) and ``params_hash``.

The names other modules use are re-exported here (``from stages.params import ...``).
"""

from stages.params.schema import (
    CocoImportConfig,
    ConfigError,
    HeadsConfig,
    ParamsFile,
    PretrainedModelConfig,
    SyntheticBenchmarkConfig,
    TrainedModelConfig,
)
from stages.params.view import (
    StageParams,
    _error_lines,
    declared_keys,
    load_params_file,
    params_hash,
    read_params,
    validate_section,
    write_params_audit,
)

__all__ = [
    "CocoImportConfig",
    "ConfigError",
    "HeadsConfig",
    "ParamsFile",
    "PretrainedModelConfig",
    "StageParams",
    "SyntheticBenchmarkConfig",
    "TrainedModelConfig",
    "_error_lines",
    "declared_keys",
    "load_params_file",
    "params_hash",
    "read_params",
    "validate_section",
    "write_params_audit",
]
