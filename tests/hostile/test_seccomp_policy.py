"""What the seccomp policy refuses without killing the job, and what it leaves working.

Address families a job does not need fail with EAFNOSUPPORT (programs probe
families and cope); clock changes fail with the kernel's own EPERM while
reading the clock's state works. Each job here must end normally, and the
`sandbox` fixture checks that the next job still works."""

from __future__ import annotations

import ctypes
import errno
import socket
from typing import Any

import pyseccomp  # type: ignore[import-untyped]
import pytest
from conftest import Runner  # type: ignore[import-not-found]

pytestmark = pytest.mark.hostile

# The socket type every probe below uses. The kernel checks the type (EINVAL)
# before it looks the family up, so from the kernel a probe of any family
# gets EINVAL, whether or not this host has the family: EAFNOSUPPORT can only
# come from the filter.
BAD_TYPE = 15
ALLOWED = (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6)

ATTEMPT = (
    "import ctypes, errno, socket\n"
    "def attempt(call, *args):\n"
    "    try:\n"
    "        call(*args)\n"
    "        return 'ok'\n"
    "    except OSError as e:\n"
    "        return errno.errorcode[e.errno]\n"
)


def _host_errno(family: int) -> str:
    with pytest.raises(OSError) as e:
        socket.socket(family, BAD_TYPE)
    return errno.errorcode[e.value.errno or 0]


def test_the_probe_reaches_the_kernel_on_the_host() -> None:
    # What makes EAFNOSUPPORT in a job the filter's answer, not the kernel's.
    for family in (socket.AF_VSOCK, socket.AF_NETLINK, socket.AF_PACKET, socket.AF_ALG, 0):
        assert _host_errno(family) == "EINVAL", family


def test_vsock_to_the_hypervisor_is_refused(sandbox: Runner) -> None:
    src = ATTEMPT + (
        "def connect():\n"
        "    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\n"
        "    s.settimeout(3)\n"
        "    s.connect((2, 9999))\n"  # CID 2: the host
        "def bind():\n"
        "    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\n"
        "    s.bind((socket.VMADDR_CID_ANY, 4242))\n"
        "    s.listen(1)\n"
        "def main(bad_type):\n"
        "    return [attempt(connect), attempt(bind),\n"
        "            attempt(socket.socket, socket.AF_VSOCK, bad_type),\n"
        "            attempt(socket.socketpair, socket.AF_VSOCK, bad_type)]\n")
    out = sandbox.py(src, {"bad_type": BAD_TYPE})
    assert out.ok, out.failure
    assert out.value == ["EAFNOSUPPORT"] * 4


@pytest.mark.parametrize("call", [
    "socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)",                     # NETLINK_ROUTE
    "socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 15)",                  # uevents
    "socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))",        # ETH_P_ALL
    "socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x800))",
    "socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET).bind(('hash', 'sha256'))",
    "socket.if_nameindex()",                                                    # glibc asks netlink
])
def test_other_families_are_refused(sandbox: Runner, call: str) -> None:
    out = sandbox.py(ATTEMPT + f"def main():\n    return attempt(lambda: {call})\n")
    assert out.ok, out.failure
    assert out.value == "EAFNOSUPPORT"


def test_every_family_but_unix_and_ip_is_refused(sandbox: Runner) -> None:
    src = ATTEMPT + (
        "def main(bad_type):\n"
        "    return [[attempt(socket.socket, f, bad_type), attempt(socket.socketpair, f, bad_type)]\n"
        "            for f in range(64)]\n")
    out = sandbox.py(src, {"bad_type": BAD_TYPE})
    assert out.ok, out.failure
    want = [["EINVAL", "EINVAL"] if f in ALLOWED else ["EAFNOSUPPORT", "EAFNOSUPPORT"]
            for f in range(64)]
    assert out.value == want


def test_the_high_half_of_the_family_does_not_slip_through(sandbox: Runner) -> None:
    # The kernel takes the low 32 bits of the register as the family.
    nr = pyseccomp.resolve_syscall(pyseccomp.system_arch(), "socket")
    vsock = (1 << 32) | socket.AF_VSOCK
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(ctypes.c_long(nr), ctypes.c_long(vsock), ctypes.c_long(BAD_TYPE),
                        ctypes.c_long(0)) == -1
    assert ctypes.get_errno() == errno.EINVAL  # on the host: the kernel saw AF_VSOCK
    src = ATTEMPT + (
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "def main(nr, families, bad_type):\n"
        "    got = []\n"
        "    for f in families:\n"
        "        r = libc.syscall(ctypes.c_long(nr), ctypes.c_long(f), ctypes.c_long(bad_type),\n"
        "                         ctypes.c_long(0))\n"
        "        got.append([r, errno.errorcode[ctypes.get_errno()]])\n"
        "    return got\n")
    # AF_UNIX with a high half is refused too: no libc passes one.
    out = sandbox.py(src, {"nr": nr, "families": [vsock, (1 << 32) | socket.AF_UNIX, -1],
                           "bad_type": BAD_TYPE})
    assert out.ok, out.failure
    assert out.value == [[-1, "EAFNOSUPPORT"]] * 3


def test_unix_and_loopback_ip_sockets_still_work(sandbox: Runner) -> None:
    # getaddrinfo with AI_ADDRCONFIG asks netlink for the configured addresses;
    # refused, glibc assumes IPv4 and IPv6 both are.
    src = ("import multiprocessing, socket\n"
           "def unix_path():\n"
           "    srv = socket.socket(socket.AF_UNIX)\n"
           "    srv.bind('/tmp/sock')\n"
           "    srv.listen(1)\n"
           "    c = socket.socket(socket.AF_UNIX)\n"
           "    c.connect('/tmp/sock')\n"
           "    conn, _ = srv.accept()\n"
           "    c.sendall(b'over a path')\n"
           "    return conn.recv(100).decode()\n"
           "def bound(family, host):\n"
           "    s = socket.socket(family)\n"
           "    s.bind((host, 0))\n"
           "    s.listen(1)\n"
           "    return s.getsockname()[1] > 0\n"
           "def main():\n"
           "    a, b = socket.socketpair()\n"
           "    a.sendall(b'pair')\n"
           "    addrs = {ai[4][:2] for ai in socket.getaddrinfo('localhost', 80, socket.AF_INET,\n"
           "             socket.SOCK_STREAM, 0, socket.AI_ADDRCONFIG)}\n"
           "    with multiprocessing.Pool(2) as p:\n"
           "        absolute = p.map(abs, [-4, -9])\n"
           "    return [b.recv(10).decode(), unix_path(), bound(socket.AF_INET, '127.0.0.1'),\n"
           "            bound(socket.AF_INET6, '::'), sorted(addrs), absolute]\n")
    out = sandbox.py(src)
    assert out.ok, out.failure
    assert out.value == ["pair", "over a path", True, True, [["127.0.0.1", 80]], [4, 9]]


# struct timex: the fields used here, then the rest (208 bytes on 64-bit Linux).
TIMEX = (
    "import ctypes\n"
    "class Timex(ctypes.Structure):\n"
    "    _fields_ = [('modes', ctypes.c_uint), ('offset', ctypes.c_long), ('freq', ctypes.c_long),\n"
    "                ('maxerror', ctypes.c_long), ('esterror', ctypes.c_long),\n"
    "                ('status', ctypes.c_int), ('constant', ctypes.c_long),\n"
    "                ('rest', ctypes.c_char * 152)]\n"
    "assert ctypes.sizeof(Timex) == 208\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "ADJ_OFFSET, ADJ_TIMECONST, CLOCK_REALTIME = 0x0001, 0x0020, 0\n"
    "def adjtimex(modes=0, clock=None, **values):\n"
    "    t = Timex(modes=modes, **values)\n"
    "    ctypes.set_errno(0)\n"
    "    if clock is None:\n"
    "        ret = libc.adjtimex(ctypes.byref(t))\n"
    "    else:\n"
    "        ret = libc.clock_adjtime(clock, ctypes.byref(t))\n"
    "    return [ret, ctypes.get_errno() if ret < 0 else 0, t.constant]\n"
)


def _host_timex() -> dict[str, Any]:
    scope: dict[str, Any] = {}
    exec(TIMEX, scope)  # noqa: S102 - the same definition the job uses
    ret, err, constant = scope["adjtimex"]()
    assert ret >= 0 and err == 0
    return {"constant": constant}


def test_reading_the_clock_works_and_changing_it_does_not(sandbox: Runner) -> None:
    before = _host_timex()
    src = TIMEX + (
        "def main(constant):\n"
        "    return {'read': adjtimex(),\n"
        "            'offset': adjtimex(ADJ_OFFSET, offset=1),\n"
        "            'timeconst': adjtimex(ADJ_TIMECONST, constant=constant),\n"
        "            'clock_read': adjtimex(clock=CLOCK_REALTIME),\n"
        "            'clock_offset': adjtimex(ADJ_OFFSET, clock=CLOCK_REALTIME, offset=1)}\n")
    changed = (before["constant"] + 3) % 8
    out = sandbox.py(src, {"constant": changed})
    assert out.ok, out.failure  # not killed as forbidden
    got = out.value
    for read in ("read", "clock_read"):  # the host's clock state (TIME_OK..TIME_ERROR)
        assert 0 <= got[read][0] <= 5 and got[read][1:] == [0, before["constant"]], got
    for change in ("offset", "timeconst", "clock_offset"):
        assert got[change][:2] == [-1, errno.EPERM], got
    assert _host_timex() == before
