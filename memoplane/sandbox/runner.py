"""Runs the user's code inside an already isolated child and encodes the result.

Results are (header, payload) pairs for protocol.send. Small values travel in
the payload; bigger ones are written to $MEMOPLANE_OUT/.memoplane-return so
that they never have to fit in a channel buffer.
"""

from __future__ import annotations

import ctypes
import errno
import inspect
import json
import json.encoder
import linecache
import mmap
import os
import random
import signal
import sys
import traceback
import types
from typing import Any

from memoplane.sandbox.protocol import MAX_PAYLOAD, _not_serialisable, _parse, dumps
from memoplane.sandbox.types import RETURN_FILE, VALUE_FILE_NAMES, Limits

Result = tuple[dict[str, Any], bytes]
NPY_MAGIC = b"\x93NUMPY"  # how every .npy file starts (numpy.lib.format.MAGIC_PREFIX)


def failure(reason: str, message: str, detail: str) -> Result:
    return {"ok": False, "failure": {"reason": reason, "message": message,
                                     "detail": detail}}, b""


_NP_MT: int | None = None  # address of numpy's global MT19937 state (key, pos); 0: use the API
_MT_KEY_BYTES = 624 * 4


def reseed() -> None:
    """Children share the zygote's RNG state until reseeded from the kernel.

    `random` is reseeded here: the zygote forks with isolate.fork_lean, which
    skips the reseed CPython registers with os.register_at_fork. numpy's
    global RandomState gets a whole new Mersenne Twister key (19968 bits)
    from the kernel. The zygote does it once through numpy's API (which also
    drops a cached gauss) and checks where the generator keeps its C state
    ({uint32 key[624]; int pos}); a child then writes a new key and pos=624
    there directly: numpy's set_state touches ~60 more pages, and every
    touched page is a private copy in each child. (The legacy gauss cache is
    left alone: it is empty, as the zygote's last use of the generator is
    this reseed in rehearse().) Only generators the zygote
    already created are shared; one imported later by the job seeds itself
    (numpy.random is imported lazily, so looking at `np.random` here would
    import it on every request)."""
    global _NP_MT
    random.seed()
    npr = sys.modules.get("numpy.random")
    if npr is None:
        return
    rs = npr.mtrand._rand
    if _NP_MT:
        ctypes.memmove(_NP_MT, os.urandom(_MT_KEY_BYTES), _MT_KEY_BYTES)
        ctypes.c_int.from_address(_NP_MT + _MT_KEY_BYTES).value = 624
        return
    np = sys.modules["numpy"]
    rs.set_state(("MT19937", np.frombuffer(os.urandom(_MT_KEY_BYTES), np.uint32), 624, 0, 0.0))
    if _NP_MT is None:
        _NP_MT = _mt_state_address(np, rs)


def _mt_state_address(np: Any, rs: Any) -> int:
    """Where `rs` keeps its MT19937 key and position, if numpy's layout is the
    one reseed() writes; 0 otherwise (children then go through set_state)."""
    try:
        addr = int(rs._bit_generator.ctypes.state_address)
        name, key, pos, _, _ = rs.get_state()
        raw = ctypes.string_at(addr, _MT_KEY_BYTES)
        here = ctypes.c_int.from_address(addr + _MT_KEY_BYTES).value
        ok = name == "MT19937" and raw == np.asarray(key, np.uint32).tobytes() and here == pos
        return addr if ok else 0
    except (AttributeError, TypeError, ValueError):
        return 0


def rehearse() -> None:
    """Exercise the request path once with a dummy job, so that lazily built
    state (caches, interned names, the code of these functions) is created
    where it is then shared: in the zygote before it freezes; and again in
    every warm child before it waits, which takes the copy-on-write faults
    of compiling and running a job (~0.3 ms) before the request instead of
    on its way (about 0.25 MiB more private memory per idle child). Ends
    with reseed()."""
    source = "def main(x):\n    return [x]\n"
    task: dict[str, Any] = {"source": source, "entrypoint": "main", "inputs": {"x": 1},
                            "filename": "<rehearsal>"}
    code = compile(source, "<rehearsal>", "exec")
    scope: dict[str, Any] = {}
    exec(code, scope)  # noqa: S102 - our own rehearsal snippet
    _inputs(task, scope["main"], "/")
    _dumps_value(scope["main"](1))
    _parse(dumps(task).encode())  # how a request arrives
    linecache.cache.pop("<rehearsal>", None)
    reseed()  # numpy builds state on its first seeding: once here, not in every child


def run_python(task: dict[str, Any], env: dict[str, str], in_dir: str, out_dir: str,
               limits: Limits) -> Result:
    set_environ(env)
    os.chdir(env["HOME"])
    filename = task.get("filename") or "<job>"
    source = task["source"]
    try:
        code = compile(source, filename, "exec")
    except (SyntaxError, ValueError) as e:
        return _syntax_failure(e, filename)
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    scope: dict[str, Any] = {"__name__": "__memoplane_job__", "__file__": filename}
    pid = os.getpid()
    try:
        exec(code, scope)  # noqa: S102 - running the job is the point; module-level code is user code
        fn = scope.get(task["entrypoint"])
        if not callable(fn):
            return failure("no-entrypoint", f"entrypoint {task['entrypoint']!r} is "
                           f"{'not callable' if task['entrypoint'] in scope else 'not defined'} "
                           f"in {filename} — define `def {task['entrypoint']}(...)` or set entrypoint", "")
        inputs, bad = _inputs(task, fn, in_dir)
        if bad is not None:
            return bad
        value = fn(**inputs)
    except BaseException as e:  # noqa: BLE001 - everything the job raises is its failure
        _exit_if_forked(pid)
        return _exception_failure(e, filename, limits)
    _exit_if_forked(pid)
    return _encode(value, out_dir, limits)


_ENVIRON: dict[str, str] | None = None  # what set_environ last installed, in this process


def set_environ(env: dict[str, str]) -> None:
    """Make the environment (C's and os.environ) exactly `env`.

    A root zygote installs the job's base environment in itself before it
    forks (child.base_environ); a request then only changes what differs."""
    global _ENVIRON
    if _ENVIRON is None:
        _set_environ(env)
    else:
        data = os.environ._data  # type: ignore[attr-defined]
        for k in _ENVIRON.keys() - env.keys():
            kb = os.fsencode(k)
            os.unsetenv(kb)
            data.pop(kb, None)
        for k, v in env.items():
            if _ENVIRON.get(k) != v:
                kb, vb = os.fsencode(k), os.fsencode(v)
                os.putenv(kb, vb)
                data[kb] = vb
    _ENVIRON = dict(env)


def _set_environ(env: dict[str, str]) -> None:
    """Replace the environment (C's and os.environ). Writes CPython's bytes
    mapping behind os.environ directly: the generic clear()/update() path
    takes about twice the copy-on-write faults in a warm child."""
    data = getattr(os.environ, "_data", None)
    if not isinstance(data, dict) or os.name != "posix":
        os.environ.clear()
        os.environ.update(env)
        return
    for key in list(data):
        os.unsetenv(key)
    data.clear()
    for k, v in env.items():
        kb, vb = os.fsencode(k), os.fsencode(v)
        os.putenv(kb, vb)
        data[kb] = vb


def _exit_if_forked(pid: int) -> None:
    # A job that forks returns from its entrypoint twice; only the original reports.
    if os.getpid() != pid:
        os._exit(0)


def _syntax_failure(e: Exception, filename: str) -> Result:
    detail = "".join(traceback.format_exception_only(type(e), e))
    where = f"{filename}:{getattr(e, 'lineno', '?')}"
    msg = getattr(e, "msg", str(e))
    return failure("syntax", f"the job's source does not compile: {msg} at {where} — fix the source", detail)


def _inputs(task: dict[str, Any], fn: Any, in_dir: str) -> tuple[dict[str, Any], Result | None]:
    inputs = dict(task.get("inputs") or {})
    deliveries = task.get("file_deliveries") or {}
    for name, rel in (task.get("file_inputs") or {}).items():
        try:
            inputs[name] = _file_input(in_dir, rel, deliveries.get(name, "bytes"))
        except (OSError, ValueError) as e:
            if isinstance(e, OSError) and e.errno == errno.ENOMEM:  # e.g. no address space left to map it
                return {}, failure("memory", f"file input {name!r} does not fit in the job's memory limit "
                                   f"({e.strerror}) — raise the memory limit or take it as a path or file", "")
            return {}, failure("bad-input", f"file input {name!r} ({rel}) cannot be read: {e} — "
                               "put the file under the job's in_dir", "")
    for name, seed in (task.get("seed_inputs") or {}).items():
        try:
            inputs[name] = _seed_input(in_dir, seed)
        except (OSError, ValueError) as e:
            return {}, failure("bad-input", f"seed input {name!r} cannot be generated: {e}", "")
    sig = _signature(fn)
    if sig is None:
        return inputs, None
    params, named, required, var_kw = sig
    shown = f"{getattr(fn, '__name__', 'entrypoint')}({', '.join(params)})"
    if not var_kw:
        unknown = sorted(set(inputs) - set(named))
        if unknown:
            return {}, failure("bad-input", f"unknown input {unknown[0]!r}: the entrypoint is "
                               f"{shown} — rename the input or add the parameter", "")
    missing = [n for n in required if n not in inputs]
    if missing:
        return {}, failure("bad-input", f"missing input {missing[0]!r} required by {shown} — "
                           "provide it or give the parameter a default", "")
    return inputs, None


Signature = tuple[list[str], list[str], list[str], bool]  # all, by keyword, required, **kw


def _signature(fn: Any) -> Signature | None:
    """What inspect.signature would say, read off a plain function's code object:
    inspect's general algorithm touches enough of the shared interpreter to
    cost a warm child ~30 copy-on-write page faults on the request path."""
    code = getattr(fn, "__code__", None)
    if not isinstance(fn, types.FunctionType) or code is None or hasattr(fn, "__wrapped__"):
        return _inspect_signature(fn)
    npos, nkw, flags = code.co_argcount, code.co_kwonlyargcount, code.co_flags
    names = code.co_varnames
    pos, kwonly = list(names[:npos]), list(names[npos:npos + nkw])
    extra = npos + nkw
    var_pos = [names[extra]] if flags & inspect.CO_VARARGS else []
    var_kw = [names[extra + len(var_pos)]] if flags & inspect.CO_VARKEYWORDS else []
    ndef = len(fn.__defaults__ or ())
    kwdefaults = fn.__kwdefaults__ or {}
    by_kw = pos[code.co_posonlyargcount:] + kwonly
    required = [n for n in pos[code.co_posonlyargcount:npos - ndef]]
    required += [n for n in kwonly if n not in kwdefaults]
    return pos + var_pos + kwonly + var_kw, by_kw, required, bool(var_kw)


def _inspect_signature(fn: Any) -> Signature | None:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    by_kw = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    required = [n for n in by_kw if params[n].default is params[n].empty]
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
    return list(params), by_kw, required, var_kw


def _seed_input(in_dir: str, seed: dict[str, Any]) -> Any:
    """The seed's values, generated here: preloaded by the python profile, so no import cost."""
    import memoplane.gmem.transfer as transfer
    from memoplane.errors import InputError

    try:
        rel = seed.get("overlay")
        overlay = None
        if rel:
            overlay = transfer.load_overlay(_input_path(in_dir, rel), str(seed["params"].get("dtype", "float64")))
        return transfer.generate(seed["params"], int(seed["offset"]), int(seed["count"]), overlay)
    except InputError as e:
        raise ValueError(str(e)) from None


def _input_path(in_dir: str, rel: str) -> str:
    path = os.path.normpath(os.path.join(in_dir, rel))
    if not path.startswith(in_dir.rstrip("/") + "/"):
        raise ValueError("path leaves in_dir")
    return path


def _file_input(in_dir: str, rel: str, delivery: str) -> Any:
    """The input as the job declared it: its path or an open file never loads
    the content, so an input may be larger than the job's memory limit."""
    path = _input_path(in_dir, rel)
    if delivery == "path":
        os.stat(path)  # a missing file is a bad input here, not a puzzle in user code
        return path
    if delivery == "file":
        return open(path, "rb")  # the job owns it; a child runs one job and exits
    if delivery == "mmap":
        return _mapped(path)
    if delivery != "bytes":
        raise ValueError(f"unknown delivery {delivery!r}")
    if path.endswith(".npy"):
        import numpy as np
        return np.load(path, allow_pickle=False)
    with open(path, "rb") as f:
        return f.read()


def _mapped(path: str) -> Any:
    """The file mapped read-only: its pages come from the page cache as the job touches them,
    are never copied into the job's own memory, and can be dropped again under pressure. A .npy
    file (told by its magic: input names carry no extension) is a read-only numpy array."""
    with open(path, "rb") as f:
        if f.read(len(NPY_MAGIC)) == NPY_MAGIC:
            import numpy as np
            return np.load(path, mmap_mode="r", allow_pickle=False)
        if os.fstat(f.fileno()).st_size == 0:
            return b""  # nothing to map (mmap refuses an empty file); an empty input reads the same
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def mapped_input_bytes(task: dict[str, Any], in_dir: str) -> int:
    """The address space the job's mmap inputs take (page-rounded): added to RLIMIT_AS, which
    counts file mappings, so a mapped input does not eat the job's allowance for its own memory."""
    page = mmap.PAGESIZE
    total = 0
    deliveries = task.get("file_deliveries") or {}
    for name, rel in (task.get("file_inputs") or {}).items():
        if deliveries.get(name) != "mmap":
            continue
        try:
            size = os.stat(_input_path(in_dir, rel)).st_size
        except (OSError, ValueError):
            continue  # reported as a bad input when the runner opens it
        total += -(-size // page) * page + page  # numpy maps from a page boundary below the data
    return total


def _user_tb(e: BaseException, filename: str) -> Any:
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    return tb or e.__traceback__


def _exception_failure(e: BaseException, filename: str, limits: Limits) -> Result:
    tb = _user_tb(e, filename)
    detail = "".join(traceback.format_exception(type(e), e, tb))
    frames = traceback.extract_tb(tb) if tb else []
    user = [f for f in frames if f.filename == filename]
    where = f" at {filename}:{user[-1].lineno}" if user else ""
    text = " ".join(f"{type(e).__name__}: {e}".split())[:300]
    if isinstance(e, SystemExit):
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return {**failure("exit", f"the job called sys.exit({e.code!r}){where} — return a value "
                          "instead", detail)[0], "exit_code": code}, b""
    if isinstance(e, MemoryError):
        return failure("memory", f"the job ran out of memory{where} (limit "
                       f"{limits.memory_bytes} bytes) — raise limits.memory_bytes or use less", detail)
    if isinstance(e, OSError) and e.errno in (errno.EFBIG, errno.ENOSPC):
        return failure("output-too-large", f"{text}{where}: a file hit the size cap "
                       f"(work dir {limits.workdir_bytes} bytes, files {limits.max_output_bytes} "
                       "bytes) — write less or raise the limits", detail)
    return failure("exception", f"{text}{where} — fix the job's code or its inputs", detail)


def _encode(value: Any, out_dir: str, limits: Limits) -> Result:
    np = sys.modules.get("numpy")
    if value is None:
        return {"ok": True, "kind": "none"}, b""
    if np is not None and isinstance(value, np.ndarray):
        return _save_array(np, value, out_dir)
    if np is not None and isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (bytes, bytearray, memoryview)):
        kind, data = "bytes", bytes(value)
    else:
        try:
            data = _dumps_value(value).encode()
        except (TypeError, ValueError) as e:
            return failure("unserializable", f"the return value is not JSON-serialisable ({e}) — "
                           "return JSON data, bytes or a numpy array", "")
        except RecursionError:
            return failure("unserializable", "the return value nests too deeply to encode (or contains "
                           "itself) — return flatter data", "")
        kind = "json"
    if len(data) > limits.max_output_bytes:
        return failure("output-too-large", f"the return value has {len(data)} bytes, over "
                       f"max_output_bytes={limits.max_output_bytes} — return less or write files", "")
    if len(data) <= MAX_PAYLOAD:
        return {"ok": True, "kind": kind}, data
    with open(os.path.join(out_dir, RETURN_FILE), "wb") as f:
        f.write(data)
    return {"ok": True, "kind": kind, "value_file": RETURN_FILE}, b""


def _dumps_value(value: Any) -> str:
    """json.dumps(value, allow_nan=False, separators=(",", ":")) through
    json's C encoder directly: the Python layers build a JSONEncoder per
    call, ~10 more copy-on-write faults in a child."""
    make = json.encoder.c_make_encoder  # type: ignore[attr-defined]
    if make is None:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    return "".join(make({}, _not_serialisable, json.encoder.encode_basestring_ascii, None,
                        ":", ",", False, False, False)(value, 0))


def _save_array(np: Any, value: Any, out_dir: str) -> Result:
    if value.dtype.hasobject:
        return failure("unserializable", "the returned array holds Python objects — return a "
                       "numeric array, JSON data or bytes", "")
    try:
        np.save(os.path.join(out_dir, VALUE_FILE_NAMES["file"]), value, allow_pickle=False)
    except OSError as e:
        return failure("output-too-large" if e.errno in (errno.EFBIG, errno.ENOSPC) else "sandbox",
                       f"could not save the returned array: {e}", "")
    return {"ok": True, "kind": "file"}, b""


def restore_signals() -> None:
    """Python ignores SIGPIPE and SIGXFSZ; programs we exec expect defaults."""
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)


def run_command(argv: list[str], env: dict[str, str]) -> Result:
    """fork + exec as a child of this pid-1 process, reaping every orphan."""
    os.chdir(env["HOME"])
    r, w = os.pipe()  # close-on-exec: stays empty when exec succeeds
    pid = os.fork()
    if pid == 0:
        os.close(r)
        restore_signals()
        try:
            os.execvpe(argv[0], argv, env)
        except OSError as e:
            os.write(w, f"{e.errno}".encode())
        os._exit(127)
    os.close(w)
    err = os.read(r, 64)
    os.close(r)
    status = _reap_all(pid)
    if err:
        en = int(err)
        return failure("exit", f"cannot run {argv[0]!r}: {os.strerror(en)} — check the "
                       "command and that it exists in the runtime", "")
    if os.WIFSIGNALED(status):
        return {"ok": False, "signal": os.WTERMSIG(status)}, b""
    code = os.WEXITSTATUS(status)
    if code != 0:
        return {**failure("exit", f"the command exited with status {code} — see stderr", "")[0],
                "exit_code": code}, b""
    return {"ok": True, "kind": "none", "exit_code": 0}, b""


def _reap_all(pid: int) -> int:
    """The command's exit status, once every process it started has ended too:
    as pid 1 we inherit its orphans, and a job's outputs are only complete
    when nothing is left to write them (a lingering process runs into the
    job's timeout)."""
    status = 0
    while True:
        try:
            got, st = os.wait()
        except ChildProcessError:
            return status
        if got == pid:
            status = st
