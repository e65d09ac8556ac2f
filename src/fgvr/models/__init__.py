"""Models: the only way any part of fgvr gets one is a lease from the process-wide registry.

    from fgvr.models import registry, parse_spec, ModelSpec, MemoryBudgetError
    with registry.use(parse_spec("efficientnet-lite0")) as enc:
        ...

Importing this package loads no model and imports no model code (families are imported on first load).
"""

from fgvr.models import registry
from fgvr.models.registry import MemoryBudgetError, MemoryReport, Registry
from fgvr.models.spec import ModelSpec, SpecError, parse_spec

__all__ = ["registry", "Registry", "MemoryBudgetError", "MemoryReport", "ModelSpec", "SpecError", "parse_spec"]
