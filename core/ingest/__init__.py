"""Ingestion: every input format of the history directory -> the normalised tables.

``load_history`` reads a directory (see data/CONTRACT.md); ``tables_from_objects`` parses the
same records given as Python objects, for the REST service.
"""

from core.ingest.history import load_history
from core.ingest.objects import tables_from_objects

__all__ = ["load_history", "tables_from_objects"]
