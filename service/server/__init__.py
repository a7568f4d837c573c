"""The residue sidecar (DESIGN.md §1, §5): gRPC ingest from the vLLM plugin, records, flags, metrics.

``Sidecar`` runs one; ``serve`` is the ``residue serve`` command; ``ServerConfig`` holds its settings.
"""

from residue_monitor.service.server.config import ServerConfig
from residue_monitor.service.server.sidecar import Sidecar, serve

__all__ = ["ServerConfig", "Sidecar", "serve"]
