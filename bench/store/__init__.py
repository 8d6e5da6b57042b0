"""The results store: SQLAlchemy 2 models, Alembic migrations and transactional helpers."""

from bench.store.db import DEFAULT_DB_URL, InvalidDatabaseURL, Store, StoreError, resolve_db_url
from bench.store.schema import Base, Evaluation, Model, SampleResult

__all__ = [
    "DEFAULT_DB_URL",
    "Base",
    "Evaluation",
    "InvalidDatabaseURL",
    "Model",
    "SampleResult",
    "Store",
    "StoreError",
    "resolve_db_url",
]
