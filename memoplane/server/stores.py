"""Which store a caller's team reads and writes.

Teams do not see each other's results or snapshots: each team of API keys has its own namespace
of the server's store (cas.open_namespace), so a digest or a cache key learnt from another team
finds nothing. The local team (the loopback caller when serve runs without API keys) is the
machine's own user and uses the store itself, shared with `memoplane run`.

Sharing by policy: a team may grant another team read on its results (`memoplane apikey grant`
or an admin key's PUT /v1/grants/{reader}, kept in the keys file; Caller.reads_from): the reader's /v1/run is then served a hit from the
granting team's namespace when its own has none (server/memo.py). Sandboxes, files and
snapshots are never shared.
"""

from __future__ import annotations

from ..cas import Store, open_namespace, open_store
from .apikeys import LOCAL_TEAM


def open_team_store(location: str | None, team: str) -> Store:
    if team == LOCAL_TEAM:
        return open_store(location)
    return open_namespace(location, "team-" + team)
