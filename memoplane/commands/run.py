"""`memoplane run` and `memoplane explain`: a script or command, once."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from ..cas import Store, open_store
from ..errors import InputError, JobFailed
from ..inputs import FileArg, SeedArg, parse_bytes, parse_deliveries, parse_env, parse_inputs
from ..jobs import BlobInput, CommandCode, Input, Job, JsonInput, PythonCode
from ..keys import explain_change
from ..run_report import RunReport
from ..sandbox.types import Delivery, Limits
from .render import render_value


def build_job(args: argparse.Namespace, store: Store) -> tuple[Job, str]:
    """The job and its identity (what `explain` compares against) from CLI flags."""
    code, identity = _code(args)
    limits = Limits(
        timeout_s=_positive(getattr(args, "timeout", 600.0), "--timeout"),
        memory_bytes=parse_bytes(getattr(args, "memory", "2Gi"), "--memory"),
        max_output_bytes=parse_bytes(getattr(args, "max_output", "1Gi"), "--max-output"),
    )
    parsed = parse_inputs(args.input)
    deliveries = parse_deliveries(getattr(args, "as_", []), parsed)
    job = Job(code=code, inputs=_inputs(parsed, deliveries, store),
              env=parse_env(args.env), salt=args.salt, limits=limits)
    return job, identity


def _code(args: argparse.Namespace) -> tuple[PythonCode | CommandCode, str]:
    command = list(getattr(args, "command_argv", []) or [])
    if command and args.script:
        raise InputError("both a script and a command after -- were given", "pass one: SCRIPT.py or -- CMD ARGS")
    if command:
        return CommandCode(tuple(command)), "command:" + command[0]
    if not args.script:
        raise InputError("no script or command given", "run `memoplane run SCRIPT.py` or `memoplane run -- CMD ARGS`")
    path = Path(args.script)
    if not path.is_file():
        raise InputError(f"script {args.script!r} does not exist", "check the path")
    try:
        source = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"script {args.script!r} is not UTF-8 text", "save it as UTF-8") from None
    identity = f"script:{path.resolve()}:{args.entrypoint}"
    return PythonCode(source=source, entrypoint=args.entrypoint, filename=str(path)), identity


def _inputs(parsed: dict[str, Any], deliveries: dict[str, str], store: Store) -> dict[str, Input]:
    inputs: dict[str, Input] = {}
    for name, value in parsed.items():
        if isinstance(value, FileArg):
            blob = store.put_file(value.path)
            inputs[name] = BlobInput(blob.digest, blob.size, cast(Delivery, deliveries.get(name, "bytes")))
        elif isinstance(value, SeedArg):
            from .gmem import seed_input

            inputs[name] = seed_input(store, value.name, value.offset, value.count)
        else:
            inputs[name] = JsonInput(value)
    return inputs


def _positive(value: float, flag: str) -> float:
    if value <= 0:
        raise InputError(f"{flag} {value} is not positive", f"give {flag} a number of seconds above 0")
    return value


@contextlib.contextmanager
def _lazy_pool(allow_unisolated: bool) -> Iterator[Any]:
    """A sandbox pool started only if the job misses (a hit never pays for it)."""
    pools: list[Any] = []

    def start() -> Any:
        from ..sandbox import SandboxPool

        pool = SandboxPool(profile="python", size=0, require_isolation=not allow_unisolated)
        pools.append(pool)
        return pool

    try:
        yield start
    finally:
        for pool in pools:
            pool.close()


def run_command(args: argparse.Namespace) -> int:
    if getattr(args, "over_chunks", None) or getattr(args, "combine", None):
        from .chunks import chunk_flags_problem  # not imported by the other runs (a daemon's client)

        problem = chunk_flags_problem(args)
        if problem is not None:
            raise problem
    with open_store(args.store) as store:
        job, identity = build_job(args, store)
        if getattr(args, "over_chunks", None):
            from .chunks import run_chunks_command

            try:
                with _lazy_pool(args.allow_unisolated) as sandbox:
                    return run_chunks_command(args, store, job, identity, sandbox)
            except JobFailed as failed:
                _print_failure(failed, as_json=args.json)
                return failed.exit_code
        try:
            report = _run(args, job, store, identity)
        except JobFailed as failed:
            _print_failure(failed, as_json=args.json)
            return failed.exit_code
        if args.json:
            print(json.dumps(report_json(report, store), sort_keys=True))
        else:
            _print_text(report, store)
    return 0


def _run(args: argparse.Namespace, job: Job, store: Store, identity: str) -> RunReport:
    """In a running `memoplane serve` of this store when there is one (its warm pool; see
    memoplane.commands.daemon), else in this process."""
    from .daemon import daemon_mode, run_via_daemon

    mode = daemon_mode(getattr(args, "daemon", None))
    if mode != "never":
        report = run_via_daemon(job, store, identity=identity, policy=args.policy,
                                require_isolation=not args.allow_unisolated, required=mode == "always")
        if report is not None:
            return report
    from ..embedded import run_job  # its machinery (sandbox, trust): not needed when a daemon runs the job
    from ..trust.local import Keyring

    keyring = Keyring()
    with _lazy_pool(args.allow_unisolated) as sandbox:
        return run_job(job, store, sandbox, policy=args.policy, identity=identity,
                       trust=keyring.policy(), signer=keyring.signer())


def report_json(report: RunReport, store: Store) -> dict[str, Any]:
    result = report.result
    return {
        "cache_key": report.cache_key,
        "cached": report.cached,
        "result_digest": report.result_digest,
        "result": render_value(report.result.value, report.value),
        "value_kind": report.value_kind,
        "duration_ms": round(report.duration_ms, 3),
        "compute_seconds_saved": round(report.compute_seconds_saved, 6),
        "compute_seconds": round(result.provenance.duration_s, 6),
        "outputs": _output_paths(report, store),
        "isolation": result.meta.get("isolation", {}),
        "explain": report.explain,
        "notes": report.notes,
    }


def _output_paths(report: RunReport, store: Store) -> list[str]:
    tree = report.result.output_tree
    return [] if tree is None else sorted(store.get_tree(tree.digest).entries)


def _print_text(report: RunReport, store: Store) -> None:
    """The job's own stdout/stderr first (replayed on a hit), then the value on
    stdout and a status line on stderr, so `memoplane run ... > out.json` works."""
    sys.stdout.buffer.write(store.get_bytes(report.result.stdout.digest))
    sys.stdout.flush()
    sys.stderr.buffer.write(store.get_bytes(report.result.stderr.digest))
    if report.cached:
        status = (f"cache hit {report.cache_key[:15]} in {report.duration_ms:.1f} ms "
                  f"(saved {report.compute_seconds_saved:.2f} s of compute)")
    else:
        status = f"computed {report.cache_key[:15]} in {report.duration_ms:.1f} ms"
    lines = [status] + [f"  why: {line}" for line in report.explain] + [f"  note: {n}" for n in report.notes]
    outputs = _output_paths(report, store)
    if outputs:
        lines.append(f"  outputs: {', '.join(outputs)} (memoplane result {report.result_digest[:15]}... -o DIR)")
    print("\n".join(f"memoplane: {line}" for line in lines), file=sys.stderr)
    if report.value_kind != "none":
        print(json.dumps(render_value(report.result.value, report.value), indent=2, sort_keys=True))


def _print_failure(failed: JobFailed, *, as_json: bool) -> None:
    detail = getattr(failed, "detail", "")
    if as_json:
        failure = getattr(failed, "failure", None)
        print(json.dumps({"ok": False, "reason": getattr(failure, "reason", "unknown"),
                          "message": str(failed), "detail": detail}, sort_keys=True))
    elif detail:
        sys.stderr.write(detail if detail.endswith("\n") else detail + "\n")
    print(f"memoplane: {failed}", file=sys.stderr)


def explain_command(args: argparse.Namespace) -> int:
    from ..embedded import RunHistory
    from ..trust import trusted_hit
    from ..trust.local import Keyring

    with open_store(args.store) as store:
        job, identity = build_job(args, store)
        parts = job.key_parts()
        lines = explain_change(RunHistory(store).previous(identity), parts.components())
        found = trusted_hit(store, parts.key, Keyring().policy())
        stored = found.hit is not None
        untrusted = found.verdict.reason if found.refused and found.verdict else None
        if args.json:
            print(json.dumps({"cache_key": parts.key, "stored": stored, "untrusted": untrusted, "changes": lines},
                             sort_keys=True))
            return 0
        state = "stored: the next run is a hit" if stored else \
            f"stored but not trusted ({untrusted}): the next run computes" if untrusted else \
            "not stored: the next run computes"
        print(f"key {parts.key}  ({state})")
        for line in lines or ["nothing changed since the last run"]:
            print(f"  {line}")
    return 0
