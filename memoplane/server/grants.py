"""/v1/grants: a team's grants of read on its results to other teams (stores.py, apikeys.py), by a
key of that team with the `admin` verb; kept in the keys file like the keys themselves, and
recorded in the audit log like every call. Without API keys there are no teams to share with."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Response

from ..errors import InputError
from .apikeys import ApiKeys
from .auth import Who
from .errors import ApiError


def routes(api: FastAPI, keys: ApiKeys | None) -> None:

    def keys_file() -> ApiKeys:
        if keys is None:
            raise ApiError(400, "sharing needs API keys: this server has none (every caller is the local team)",
                           "create keys with `memoplane apikey create --team T`")
        return keys

    @api.get("/v1/grants", tags=["sharing"])
    async def grants(who: Who) -> dict[str, Any]:
        """Which teams may read the caller's team's results, and whose results it may read."""
        loaded = await asyncio.to_thread(keys_file().load)
        return {"team": who.team, "readers": sorted(loaded.grants.get(who.team, [])),
                "readsFrom": list(loaded.readable_by(who.team))}

    @api.put("/v1/grants/{reader}", tags=["sharing"])
    async def grant(reader: str, who: Who) -> dict[str, Any]:
        """Let team `reader`'s /v1/run be served the caller's team's results (never its sandboxes,
        files or snapshots); from the reader's next request on."""
        try:
            new = await asyncio.to_thread(keys_file().grant, who.team, reader)
        except InputError as e:
            raise ApiError(400, str(e)) from None
        return {"team": who.team, "reader": reader, "granted": new}

    @api.delete("/v1/grants/{reader}", status_code=204, tags=["sharing"])
    async def ungrant(reader: str, who: Who) -> Response:
        if not await asyncio.to_thread(keys_file().ungrant, who.team, reader):
            raise ApiError(404, f"team {who.team} grants nothing to team {reader[:80]!r}", "GET /v1/grants lists "
                           "its grants")
        return Response(status_code=204)
