"""slimflow: workflow-orchestrated data distillation of a transformer teacher into fast text classifiers.

The Python API (``slimflow/api.py``): ``Config``, ``run``, ``Report``, ``load_student``. Its names load on first
use, so ``import slimflow.storage.shards`` stays free of Prefect and torch.
"""

from slimflow.storage.manifest import SLIMFLOW_VERSION as __version__

__all__ = ["Config", "Report", "__version__", "load_student", "run"]


def __getattr__(name: str):
    if name == "Config":
        from slimflow.flows.config import Config

        return Config
    if name in ("Report", "load_student", "run"):
        from slimflow import api

        return getattr(api, name)
    raise AttributeError(f"module 'slimflow' has no attribute {name!r}")
