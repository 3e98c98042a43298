"""The `memoplane` command line. Each subcommand parses its flags, calls one
core function and prints; errors the user can act on are one line, no traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .errors import MemoplaneError
from .sandbox.types import DELIVERIES

AS_HELP = ("how a Python job receives the @FILE input NAME: bytes (default; a numpy array for .npy), path "
           "(the read-only file's path), file (the file opened for reading) or mmap (mapped read-only: a numpy "
           "array for .npy, else an mmap; not counted against --memory); part of the key (repeatable)")
AS_METAVAR = "NAME=" + "|".join(DELIVERIES)

Handler = Callable[[argparse.Namespace], int]


def _store_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        metavar="DIR",
        help="the store directory (default: $MEMOPLANE_STORE or ~/.cache/memoplane/store)",
    )


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="run a Python script or a command once; later identical runs return the stored result",
        description="memoplane run SCRIPT.py [options]   or   memoplane run [options] -- CMD ARGS...",
    )
    p.add_argument("script", nargs="?", help="a Python file whose entrypoint is called with the inputs")
    p.add_argument("--input", "-i", action="append", default=[], metavar="NAME=JSON|NAME=@FILE",
                   help="an input: a JSON value, @FILE for a file's bytes, or @seed:NAME:OFFSET:COUNT for "
                        "a range of a gmem seed, generated in the sandbox (repeatable)")
    p.add_argument("--as", dest="as_", action="append", default=[], metavar=AS_METAVAR, help=AS_HELP)
    p.add_argument("--entrypoint", "-e", default="main", help="the function to call (default: main)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for the job; part of the key (repeatable). NAME: letters, "
                        "digits, '_', '-', '.', not a digit first, not MEMOPLANE_*; VALUE: no NUL")
    p.add_argument("--version", dest="salt", default="", metavar="SALT",
                   help="a cache version: change it to force new results for the same code and inputs")
    p.add_argument("--policy", choices=["Use", "Refresh", "Bypass"], default="Use",
                   help="Use the cache (default), Refresh (recompute and replace), or Bypass it")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS", help="wall-clock limit (default 600)")
    p.add_argument("--memory", default="2Gi", metavar="QUANTITY", help="memory limit, e.g. 512Mi (default 2Gi)")
    p.add_argument("--max-output", default="1Gi", metavar="QUANTITY", help="cap on output files (default 1Gi)")
    p.add_argument("--allow-unisolated", action="store_true",
                   help="run even if this host lacks a sandbox primitive (recorded in the result)")
    p.add_argument("--over-chunks", metavar="NAME",
                   help="run the script once per content-defined chunk (whole rows) of the file input NAME and "
                        "combine the results with --combine; an edit reruns only the chunks it touches")
    p.add_argument("--combine", metavar="FUNC", help="with --over-chunks: the script's associative combine(a, b)")
    p.add_argument("--chunk-bytes", metavar="QUANTITY",
                   help="with --over-chunks: the target chunk size (default $MEMOPLANE_CHUNK_TASK_BYTES or 256Ki)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="with --over-chunks: chunk and combine tasks run at once (default: the cores, at most 4)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    from .settings import DAEMON_HELP, DAEMON_MODES

    p.add_argument("--daemon", choices=DAEMON_MODES, help=DAEMON_HELP)
    _store_flag(p)
    p.set_defaults(handler=_lazy("memoplane.commands.run", "run_command"))


def _add_explain(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("explain", help="show which part of the key changed since the last run of a script")
    p.add_argument("script", nargs="?")
    p.add_argument("--input", "-i", action="append", default=[], metavar="NAME=JSON|NAME=@FILE")
    p.add_argument("--as", dest="as_", action="append", default=[], metavar=AS_METAVAR, help=AS_HELP)
    p.add_argument("--entrypoint", "-e", default="main")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--version", dest="salt", default="")
    p.add_argument("--json", action="store_true")
    _store_flag(p)
    from .commands.history import add_explain_flags

    add_explain_flags(p)
    p.set_defaults(handler=_explain_handler)


def _explain_handler(args: argparse.Namespace) -> int:
    """Embedded: a script against its last run; --cluster: a ComputeJob's newest run against the one before."""
    if args.cluster:
        return _lazy("memoplane.commands.history", "explain_cluster_command")(args)
    return _lazy("memoplane.commands.run", "explain_command")(args)


def _add_result(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("result", help="print a stored result and write its output files")
    p.add_argument("ref", metavar="KEY_OR_DIGEST|JOB",
                   help="a cache key or result digest (b3:...) in the local store, or a ComputeJob's name")
    p.add_argument("-n", "--namespace", help="with JOB: its namespace")
    p.add_argument("-o", "--output", metavar="DIR", help="write the output files and return value here")
    p.add_argument("--json", action="store_true")
    _store_flag(p)
    p.set_defaults(handler=_result_handler)


def _result_handler(args: argparse.Namespace) -> int:
    """A cache key or result digest (b3:...) is read from the local store; anything else names a ComputeJob."""
    if args.ref.startswith("b3:"):
        return _lazy("memoplane.commands.store", "result_command")(args)
    return _lazy("memoplane.commands.cluster", "result_of_job")(args)


def _add_cluster_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("submit", help="create a ComputeJob from a Python file on the current cluster")
    p.add_argument("script", help="a Python file whose entrypoint is called with the inputs")
    p.add_argument("--input", "-i", action="append", default=[], metavar="NAME=JSON|NAME=@FILE",
                   help="an input: a JSON value, @FILE (up to 900 KiB an immutable ConfigMap; larger, uploaded "
                        "to the namespace's store and named by digest: fromBlob), or "
                        "@seed:NAME:OFFSET:COUNT (fromSeed: a range of the GMemSeed NAME)")
    p.add_argument("--as", dest="as_", action="append", default=[], metavar=AS_METAVAR, help=AS_HELP)
    p.add_argument("--entrypoint", "-e", default="main")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--version", dest="salt", default="", metavar="SALT")
    p.add_argument("--policy", choices=["Use", "Refresh", "Bypass"], default="Use")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS")
    p.add_argument("--memory", default="2Gi", metavar="QUANTITY")
    p.add_argument("--name", help="the ComputeJob's name (default: generated from the file name)")
    p.add_argument("-n", "--namespace", help="default: the kubeconfig context's namespace")
    p.add_argument("--wait", action="store_true", help="wait until it succeeds or fails, and print the result")
    p.add_argument("--wait-timeout", type=float, default=600.0, metavar="SECONDS")
    p.add_argument("--over-chunks", metavar="NAME", help="spec.map.overChunks: one task per record-aligned chunk "
                   "of the @FILE input NAME, combined by --combine")
    p.add_argument("--combine", metavar="FUNC", help="with --over-chunks: the script's associative combine(a, b)")
    p.add_argument("--dry-run", action="store_true", help="print the manifest instead of creating it")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_lazy("memoplane.commands.cluster", "submit_command"))

    for name, handler, text in (("get", "get_command", "show a ComputeJob's phase, key, node and result"),
                                ("logs", "logs_command", "print a ComputeJob's stdout and stderr")):
        p = sub.add_parser(name, help=text)
        p.add_argument("job", metavar="JOB")
        p.add_argument("-n", "--namespace")
        p.add_argument("--json", action="store_true")
        p.set_defaults(handler=_lazy("memoplane.commands.cluster", handler))


def _add_store_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("verify", help="check every stored object against its address and every ref "
                                         "against your trust policy; exit 3 on damage, 7 on untrusted refs")
    p.add_argument("--json", action="store_true")
    _store_flag(p)
    p.set_defaults(handler=_lazy("memoplane.commands.store", "verify_command"))

    p = sub.add_parser("gc", help="delete data no ref reaches (objects newer than the grace period are kept)")
    p.add_argument("--grace", type=float, default=3600.0, metavar="SECONDS", help="default 3600")
    p.add_argument("--max-age", metavar="DURATION", help="first evict refs older than this, e.g. 720h")
    p.add_argument("--max-bytes", metavar="QUANTITY", help="first evict oldest refs until under this size")
    p.add_argument("--json", action="store_true")
    _store_flag(p)
    p.set_defaults(handler=_lazy("memoplane.commands.store", "gc_command"))

    cache = sub.add_parser("cache", help="inspect the cache")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True, metavar="COMMAND")
    p = cache_sub.add_parser("stats", help="entries, logical and stored bytes, dedup ratio")
    p.add_argument("--json", action="store_true")
    _store_flag(p)
    p.set_defaults(handler=_lazy("memoplane.commands.store", "stats_command"))


def _add_trust_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`keys` (what this user signs with) and `trust` (whose signatures make a hit): commands.keys."""
    def command(group: argparse._SubParsersAction[argparse.ArgumentParser], name: str, handler: str,
                text: str) -> argparse.ArgumentParser:
        p = group.add_parser(name, help=text)
        p.add_argument("--json", action="store_true")
        p.set_defaults(handler=_lazy("memoplane.commands.keys", handler))
        return p

    keys = sub.add_parser("keys", help="the keys your results are signed with ($MEMOPLANE_KEYS_DIR or "
                                       "~/.config/memoplane/keys; one is made on first use)")
    group = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    command(group, "list", "keys_list", "your keys and the ones you trust or revoked")
    command(group, "export", "keys_export", "print a public key (default: your signing key) for a colleague") \
        .add_argument("keyid", nargs="?", metavar="KEYID")
    command(group, "create", "keys_create", "make a key NAME-1, trust it and sign new results with it") \
        .add_argument("name", metavar="NAME")
    command(group, "rotate", "keys_rotate", "replace a key (default: your signing key) by its next epoch; "
                                            "what the old one signed still counts") \
        .add_argument("keyid", nargs="?", metavar="KEYID")
    command(group, "revoke", "keys_revoke", "stop trusting what KEYID signed (revoking your signing key "
                                            "rotates it first)") \
        .add_argument("keyid", metavar="KEYID")

    trust = sub.add_parser("trust", help="whose signatures make a stored result a hit for you")
    group = trust.add_subparsers(dest="trust_command", required=True, metavar="COMMAND")
    p = command(group, "add", "trust_add", "trust a colleague's public key (the output of `memoplane keys export`)")
    p.add_argument("keyid", metavar="KEYID")
    p.add_argument("public_key", metavar="FILE_OR_PEM", help="a .pub file, - for stdin, or the PEM itself")
    command(group, "list", "trust_list", "the keys you trust and revoked, and how many signatures a hit needs")
    command(group, "remove", "trust_remove", "stop trusting KEYID").add_argument("keyid", metavar="KEYID")
    command(group, "min-signatures", "trust_min_signatures",
            "how many distinct trusted keys must sign a result for it to be a hit (default 1)") \
        .add_argument("count", type=int, metavar="N")


def _lazy(module: str, name: str) -> Handler:
    """Import a command's module only when it runs, so `memoplane --help` is instant."""

    def handler(args: argparse.Namespace) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), name)(args))

    return handler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memoplane",
        description="Every computation done once: results content-addressed, verified and shared.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"memoplane {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    _add_explain(sub)
    _add_result(sub)
    _add_cluster_commands(sub)
    _add_store_commands(sub)
    _add_trust_commands(sub)
    from .commands.gmem_args import add_parser as add_gmem

    add_gmem(sub, _lazy, _store_flag)
    from .commands.audit import add_parser as add_audit

    add_audit(sub, _lazy, _store_flag)
    from .commands.history import add_parser as add_history

    add_history(sub, _lazy, _store_flag)
    from .commands.apply_args import add_parser as add_apply

    add_apply(sub, _lazy, _store_flag)
    _add_serve(sub)
    _add_apikey(sub)
    return parser


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .settings import SERVE_FLAGS, ServeSettings, add_flags, describe

    p = sub.add_parser("serve", help="the agent API: E2B-compatible sandboxes and memoized /v1/run over HTTP",
                       epilog="environment:\n" + describe(ServeSettings),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, ServeSettings, SERVE_FLAGS)
    _store_flag(p)
    p.set_defaults(handler=_lazy("memoplane.server.serve", "serve_command"))


def _add_apikey(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .settings import API_KEYS_ENV

    apikey = sub.add_parser("apikey", help="API keys of `memoplane serve`: each of a team, with scopes")
    commands = apikey.add_subparsers(dest="apikey_command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=text)
        p.add_argument("--keys-file", metavar="PATH", help=f"the API keys file (default ${API_KEYS_ENV}, "
                       "else apikeys.json in the keys directory)")
        p.set_defaults(handler=_lazy("memoplane.server.apikey_command", f"{name}_command"))
        return p

    p = command("create", "make a key; its token is printed once")
    p.add_argument("--team", required=True, help="the team it belongs to (it sees only the team's sandboxes)")
    p.add_argument("--verb", action="append", required=True,
                   help="what it may do: run, exec, files, snapshot or admin (repeatable)")
    p.add_argument("--sandbox", metavar="ID", help="the one sandbox it may reach")
    p.add_argument("--namespace", action="append", default=[], help="a Kubernetes namespace its /v1/run may make ComputeJobs in "
                   "(repeatable; needed for /v1/run on Kubernetes)")
    p.add_argument("--tier", help="set the team's rate tier (settings: MEMOPLANE_SERVE_TIERS)")
    p.add_argument("--json", action="store_true")
    p = command("list", "the keys (never their secrets)")
    p.add_argument("--team")
    p.add_argument("--json", action="store_true")
    p = command("revoke", "refuse a key from now on")
    p.add_argument("keyid")
    for name, text in (("grant", "let another team's /v1/run be served this team's results (never its "
                                 "sandboxes, files or snapshots)"),
                       ("ungrant", "stop serving this team's results to another team")):
        p = command(name, text)
        p.add_argument("--team", required=True, help="the team whose results are shared")
        p.add_argument("--reader", required=True, help="the team that may read them")



def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """`run [opts] -- CMD ARGS` -> (our args, the command); argparse would eat CMD's flags."""
    argv = list(argv)
    if "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1 :]
    return argv, []


def main(argv: Sequence[str] | None = None) -> int:
    ours, command = split_command(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(ours)
    args.command_argv = command
    try:
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except MemoplaneError as exc:
        print(f"memoplane: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("memoplane: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `memoplane ... | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
