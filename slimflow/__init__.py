"""slimflow: workflow-orchestrated data distillation of a transformer teacher into fast text classifiers."""

from slimflow.storage.manifest import SLIMFLOW_VERSION as __version__

__all__ = ["__version__"]
