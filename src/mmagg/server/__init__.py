"""mmagg's self-hosted Model Monitoring backend (`pip install mmagg[server]`).

Example:
    >>> from mmagg.server import create_app
    >>> app = create_app("sqlite://")  # in memory; `mmagg serve` uses sqlite:///mmagg.db
"""

from mmagg.server.app import create_app
from mmagg.server.db import Database
from mmagg.server.tables import SchemaTooNewError, migrate

__all__ = ["Database", "SchemaTooNewError", "create_app", "migrate"]
