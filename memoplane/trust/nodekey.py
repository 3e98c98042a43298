"""A node agent's own signing key (DESIGN §11): made on the agent's first start, kept on the node.

Each agent attests what it computes with a key of its own, so distinct nodes are distinct
signers (a ResultCache's `minSignatures: 2` means two nodes) and a node that leaks its key
can sign as itself only. The key id is the node's name, sanitized to the key-id rule, and an
epoch: `node-a-1`. The key directory (settings MEMOPLANE_NODE_KEY_DIR, mode 0700) holds
    <keyid>.key   the private key (PKCS#8 PEM, mode 0600), written atomically, never overwritten
The latest epoch of the node's name is the one used; a restart re-uses it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

from ..errors import InputError
from ..settings import NODE_KEY_DIR_ENV
from .keys import KEYID_PATTERN, SigningKey, read_signing_key, split_keyid
from .local import write_atomically

NAME_MAX = 63   # the key-id rule's name part
SUFFIX = ".key"


def node_key_name(node: str) -> str:
    """A node name as a key name: lowercase, other characters as '-'; a name too long is cut and
    given a short hash of the whole, so two long names sharing a prefix stay distinct."""
    name = re.sub(r"[^a-z0-9]+", "-", node.lower()).strip("-") or "node"
    if len(name) > NAME_MAX:
        digest = hashlib.sha256(node.encode()).hexdigest()[:8]
        name = f"{name[:NAME_MAX - 9].strip('-')}-{digest}"
    return name


def node_key(directory: Path, node: str, first_epoch: Callable[[], int] = lambda: 1) -> SigningKey:
    """The node's latest key in `directory`, or a new one made there, `<name>-<first_epoch()>`
    (asked only then: a node whose directory was lost takes the epoch after its last one)."""
    name = node_key_name(node)
    _private_directory(directory)
    epochs = [split_keyid(p.stem)[1] for p in directory.glob(f"{name}-*{SUFFIX}")
              if KEYID_PATTERN.match(p.stem) and split_keyid(p.stem)[0] == name]
    if epochs:
        return _read(directory, f"{name}-{max(epochs)}")
    keyid = f"{name}-{max(first_epoch(), 1)}"
    key = SigningKey.generate(keyid)
    try:
        write_atomically(directory / f"{keyid}{SUFFIX}", key.pem(), 0o600, replace=False)
    except FileExistsError:  # another start of this agent made it first: use that one
        return _read(directory, keyid)
    except OSError as exc:
        raise InputError(f"{NODE_KEY_DIR_ENV}: cannot write {directory / keyid}{SUFFIX} ({exc.strerror})",
                         "give the agent a writable directory of its own") from None
    return key


def _private_directory(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)  # a hostPath the kubelet made (0755): only the agent reads its key
    except OSError as exc:
        raise InputError(f"{NODE_KEY_DIR_ENV}: cannot make {directory} private ({exc.strerror})",
                         "give the agent a directory it owns") from None


def _read(directory: Path, keyid: str) -> SigningKey:
    return read_signing_key(directory / f"{keyid}{SUFFIX}", keyid, f"{NODE_KEY_DIR_ENV}: ",
                            "give the agent its own readable directory")
