"""Job source for the output race of issue 9, finding 1 (read as text by the tests that run it).

A grandchild waits (inotify) for the host to open a file under /out/d, or for
`delay` seconds, then swaps /out/d for a symlink to `target`. Meanwhile the job
keeps its namespace alive: hold="frame" forges a result frame on the control
channel (fd 1000) and blocks in sync(); hold="thread" returns normally while a
second thread is stuck in sync().
"""

import ctypes
import json
import os
import struct
import threading
import time

libc = ctypes.CDLL(None, use_errno=True)
IN_OPEN, IN_ACCESS = 0x20, 0x1


def frame(header, payload=b""):
    body = json.dumps(header).encode()
    return struct.pack("!II", len(body), len(payload)) + body + payload


def swap(out, target, delay):
    fd = libc.inotify_init()
    libc.inotify_add_watch(fd, (out + "/d").encode(), IN_OPEN | IN_ACCESS)
    os.set_blocking(fd, False)
    end = time.monotonic() + delay
    while time.monotonic() < end:
        try:
            if os.read(fd, 4096):
                break
        except BlockingIOError:
            time.sleep(0.0005)
    os.rename(out + "/d", out + "/d.old")
    os.symlink(target, out + "/d")


def main(target, delay, hold):
    out = os.environ["MEMOPLANE_OUT"]
    os.mkdir(out + "/d")
    for k in range(20):
        with open(f"{out}/d/f{k}", "w") as f:
            f.write("x" * 100)
    if os.fork() == 0:
        swap(out, target, delay)
        os._exit(0)
    if hold == "thread":
        threading.Thread(target=libc.sync, daemon=True).start()
    else:
        os.write(1000, frame({"op": "result", "ok": True, "kind": "json"}, b'"forged"'))
        libc.sync()
        time.sleep(5)
    return "returned"
