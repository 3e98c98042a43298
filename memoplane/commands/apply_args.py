"""The `memoplane apply` argument parser, apart from the command so that building the CLI's parser
never imports the manifests' models and numpy (the command lives in memoplane.commands.apply)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], lazy: Callable[[str, str], Any],
               store_flag: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("apply", help="run ComputeJob manifests here, with the keys a cluster would derive",
                       description="memoplane apply -f FILE|DIR|- : each job runs once its fromJob inputs are "
                                   "done; a job whose key is stored is served, not run.")
    p.add_argument("-f", "--filename", action="append", required=True, metavar="FILE|DIR|-",
                   help="a manifest file (multi-document YAML or JSON), a directory of them, or - (repeatable)")
    p.add_argument("--object", action="append", default=[], metavar="BUCKET/KEY=PATH",
                   help="a local file standing for the object a fromObject input names (repeatable)")
    p.add_argument("--allow-unisolated", action="store_true",
                   help="run even if this host lacks a sandbox primitive (recorded in the result)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    store_flag(p)
    p.set_defaults(handler=lazy("memoplane.commands.apply", "apply_command"))
