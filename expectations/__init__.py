"""Great-expectations suites for every catalog table and the runner every job uses.

Import-time setting: GE's anonymous usage analytics are off for the whole process.
"""
import os

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

from expectations.runner import (  # noqa: E402  (the environment must be set before GE loads)
    ExpectationOutcome,
    ValidationFailed,
    ValidationReport,
    require_valid,
    validate_table,
)

__all__ = ["ExpectationOutcome", "ValidationFailed", "ValidationReport", "require_valid", "validate_table"]
