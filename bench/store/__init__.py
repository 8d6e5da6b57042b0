"""The results store: SQLAlchemy 2 models, Alembic migrations and transactional helpers."""

from bench.store.db import DEFAULT_DB_URL, Store, resolve_db_url
from bench.store.schema import Base, Evaluation, Model, SampleResult

__all__ = ["DEFAULT_DB_URL", "Base", "Evaluation", "Model", "SampleResult", "Store", "resolve_db_url"]
