"""`memoplane apikey create | list | revoke`: the API keys of `memoplane serve` (apikeys.py)."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime

from ..errors import InputError
from ..settings import ServeSettings, api_keys_path, from_env, serve_tiers
from .apikeys import ApiKeys


def _keys(args: argparse.Namespace) -> ApiKeys:
    return ApiKeys(api_keys_path(from_env(ServeSettings, api_keys=args.keys_file)))


def create_command(args: argparse.Namespace) -> int:
    tiers = serve_tiers(from_env(ServeSettings))
    if args.tier is not None and args.tier not in tiers:
        raise InputError(f"--tier {args.tier!r} is not a configured tier", f"use one of {', '.join(sorted(tiers))} "
                         "(MEMOPLANE_SERVE_TIERS)")
    key, token = _keys(args).create(args.team, args.verb, args.sandbox, args.tier, namespaces=args.namespace)
    if args.json:
        print(json.dumps({**key.public(), "token": token}, sort_keys=True))
    else:
        print(token)
        print(f"API key {key.keyid} of team {key.team} ({', '.join(key.verbs)}"
              f"{', sandbox ' + key.sandbox if key.sandbox else ''}"
              f"{', namespaces ' + ','.join(key.namespaces) if key.namespaces else ''}): the token above is shown only now")
    return 0


def list_command(args: argparse.Namespace) -> int:
    keys = _keys(args).load()
    for key in sorted(keys.keys.values(), key=lambda k: (k.team, k.created)):
        if args.team and key.team != args.team:
            continue
        if args.json:
            print(json.dumps({**key.public(), "tier": keys.tier_of(key.team)}, sort_keys=True))
            continue
        state = "revoked " + _when(key.revoked) if key.revoked is not None else "active"
        print(f"{key.keyid}  team={key.team}  tier={keys.tier_of(key.team)}  verbs={','.join(key.verbs)}"
              f"{'  sandbox=' + key.sandbox if key.sandbox else ''}"
              f"{'  namespaces=' + ','.join(key.namespaces) if key.namespaces else ''}  created {_when(key.created)}  {state}")
    for team, readers in sorted(keys.grants.items()):
        if readers and (not args.team or args.team in (team, *readers)):
            if args.json:
                print(json.dumps({"grant": team, "readers": sorted(readers)}, sort_keys=True))
            else:
                print(f"grant  team={team}  results read by {','.join(sorted(readers))}")
    return 0


def grant_command(args: argparse.Namespace) -> int:
    new = _keys(args).grant(args.team, args.reader)
    print(f"team {args.reader} {'may now read' if new else 'already read'} team {args.team}'s results "
          "(/v1/run hits, judged by the server's trust policy; never sandboxes, files or snapshots)")
    return 0


def ungrant_command(args: argparse.Namespace) -> int:
    gone = _keys(args).ungrant(args.team, args.reader)
    print(f"team {args.reader} {'no longer reads' if gone else 'did not read'} team {args.team}'s results"
          + (": a running server stops serving them from its next request" if gone else ""))
    return 0


def revoke_command(args: argparse.Namespace) -> int:
    key = _keys(args).revoke(args.keyid)
    print(f"revoked API key {key.keyid} of team {key.team}: a running server refuses it from its next request")
    return 0


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
