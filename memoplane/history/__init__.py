"""History and lineage (DESIGN §12): one run record per run, computed or served, kept in the
store of the cache it ran against; an index (SQLite) rebuilt from them answers the queries."""

from .records import InputRecord, JobIdentity, RunRecord, new_run_id

__all__ = ["InputRecord", "JobIdentity", "RunRecord", "new_run_id"]
