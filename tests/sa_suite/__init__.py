"""SQLAlchemy's own ORM test suite run with a one-shard ShardedSession (see run.py)."""
