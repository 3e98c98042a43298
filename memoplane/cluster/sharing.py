"""Ownership of store locations and sharing across namespaces (pure; DESIGN §11).

A location is a bucket and a key prefix. In the default bucket a namespace always owns its
home (`<namespace>/`, under MEMOPLANE_HOME's prefix if it has one) and everything below it,
whatever was created first. In other buckets (and outside the homes' prefix: another cluster's
part of a shared bucket) the namespace of the oldest ResultCache whose location overlaps (same bucket, one prefix a
prefix of the other) owns it. Caches of one namespace overlap freely; a cache in a location
another namespace owns reads and writes there only as the owner's caches containing it grant
in `spec.sharing` (readers, writers: namespace names or a selector over Namespace labels);
`spec.store.readOnly` gives up writing. A cache whose location contains another namespace's
caches (a parent prefix), or that is under no namespace's home in the default bucket, can
neither read nor write.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..canonical import canonical_json
from . import protocol as p
from .views import Body, CacheView, Ref, cache, section

Labels = Mapping[str, Mapping[str, str]]   # namespace -> its labels


@dataclass(frozen=True, order=True)
class Location:
    bucket: str
    prefix: str   # normalised: "" or "a/b/"

    def contains(self, other: Location) -> bool:
        return self.bucket == other.bucket and other.prefix.startswith(self.prefix)

    def overlaps(self, other: Location) -> bool:
        return self.contains(other) or other.contains(self)

    def __str__(self) -> str:
        return p.store_url(self.bucket, self.prefix)


def normalised(prefix: str) -> str:
    """"a//b/" -> "a/b/", "/" -> "": the key space the prefix names, whatever the slashes."""
    parts = [part for part in prefix.split("/") if part]
    return "".join(f"{part}/" for part in parts)


def location_of(view: CacheView) -> Location:
    return Location(view.bucket, normalised(view.prefix))


@dataclass(frozen=True)
class Access:
    """What a cache's jobs may do in its location, and why (one line: the owner and the fix)."""

    read: bool
    write: bool
    owner: str     # the owning namespace ("" when the location is refused outright)
    why: str = ""  # what is denied, the owner and the fix (empty: nothing but what readOnly gives up)
    guest: bool = False   # the location is another namespace's (what it serves is a shared read)

    @property
    def usable(self) -> bool:
        """Owned, or some grant: a cache with neither is Stalled."""
        return self.read or self.write


@dataclass(frozen=True)
class _Cache:
    ref: Ref
    location: Location
    read_only: bool
    sharing: Mapping[str, Any]
    age: tuple[str, str, str]   # creationTimestamp, namespace, name: oldest first

    @property
    def namespace(self) -> str:
        return self.ref[0]

    @property
    def name(self) -> str:
        return f"{self.ref[0]}/{self.ref[1]}"


def _of(body: Body) -> _Cache:
    view = cache(body)
    meta = view.meta
    return _Cache((meta.namespace, meta.name), location_of(view), view.read_only,
                  section(section(body, "spec"), "sharing"), (meta.creation_timestamp, meta.namespace, meta.name))


class _Owners:
    """The caches of one bucket that own their location, found by prefix (no scan of them all)."""

    def __init__(self) -> None:
        self._at: dict[str, list[_Cache]] = {}
        self._prefixes: list[str] = []   # sorted: those below a prefix are one run

    def add(self, c: _Cache) -> None:
        if c.location.prefix not in self._at:
            bisect.insort(self._prefixes, c.location.prefix)
        self._at.setdefault(c.location.prefix, []).append(c)

    def containing(self, prefix: str) -> list[_Cache]:
        """Those at `prefix` or above it."""
        ancestors = [""] + [prefix[:i + 1] for i, char in enumerate(prefix) if char == "/"]
        return [o for a in ancestors for o in self._at.get(a, ())]

    def below(self, prefix: str) -> list[_Cache]:
        """Those strictly below `prefix`."""
        found: list[_Cache] = []
        for other in self._prefixes[bisect.bisect_right(self._prefixes, prefix):]:
            if not other.startswith(prefix):
                break
            found.extend(self._at[other])
        return found


TIER = "/tiers[0]"   # a cache's cold tier takes part in ownership as a cache named <name>/tiers[0]


def _tier_of(body: Body) -> _Cache | None:
    """The cache's cold tier as a cache of its own (same namespace and age, writing, sharing nothing)."""
    view = cache(body)
    tier = view.cold_tier
    if tier is None:
        return None
    meta = view.meta
    return _Cache((meta.namespace, meta.name + TIER), Location(tier.bucket, normalised(tier.prefix)), False, {},
                  (meta.creation_timestamp, meta.namespace, meta.name + TIER))


def decide_access(caches: Sequence[Body], labels: Labels) -> dict[Ref, Access]:
    """Every cache's access to its location (the decisions depend on one another). A cache's cold
    tier (spec.tiers[0].store) is owned as a location of its own: a cache whose tier overlaps its
    store, or lies in a location its namespace does not own, can neither read nor write."""
    own = [_of(body) for body in caches]
    tiers = {c.ref: t for c, t in ((c, _tier_of(b)) for c, b in zip(own, caches, strict=True)) if t is not None}
    locations = {c.ref: c.location for c in own}
    ordered = sorted([*own, *tiers.values()], key=lambda c: c.age)
    by_namespace: dict[str, list[_Cache]] = {}
    for c in ordered:
        by_namespace.setdefault(c.namespace, []).append(c)
    owners: dict[str, _Owners] = {}   # per bucket
    decided: dict[Ref, Access] = {}
    for c in ordered:
        established = owners.setdefault(c.location.bucket, _Owners())
        access = _access(c, by_namespace, established, labels)
        if access.owner == c.namespace:
            established.add(c)
        decided[c.ref] = access
    for ref, tier in tiers.items():
        refused = _tier_refused(locations[ref], decided.pop(tier.ref), tier)
        if refused and decided[ref].usable:
            decided[ref] = Access(False, False, "", refused)
    return decided


def _tier_refused(store: Location, access: Access, tier: _Cache) -> str:
    """Why a cache's tier makes the cache unusable ("": it does not): it overlaps the cache's own
    location (GC there would take its objects for the store's), or its namespace does not own it."""
    if store.overlaps(tier.location):
        return f"spec.tiers[0].store {tier.location} overlaps spec.store {store}: move the tier outside it"
    if not access.owner:
        return f"spec.tiers[0].store: {access.why.replace('spec.store', 'spec.tiers[0].store')}"
    if access.owner != tier.namespace:
        return (f"spec.tiers[0].store {tier.location} is owned by namespace {access.owner}: point the tier at a "
                f"location namespace {tier.namespace} owns, e.g. under bucket {p.DEFAULT_BUCKET} prefix "
                f"{p.default_store_prefix(tier.namespace)}")
    return ""


def _access(c: _Cache, by_namespace: Mapping[str, Sequence[_Cache]], owners: _Owners, labels: Labels) -> Access:
    """`owners`: the older caches of c's bucket that own their location."""
    refused = _refused_location(c) or _contains_another(c, owners)
    if refused:
        return Access(False, False, "", refused)
    owner = _owner(c, owners)
    if owner == c.namespace:
        return Access(True, not c.read_only, owner)
    grants = [o for o in by_namespace.get(owner, ()) if o.location.contains(c.location)]
    read = any(_lists(o.sharing, "readers", c.namespace, labels) for o in grants)
    write = any(_lists(o.sharing, "writers", c.namespace, labels) for o in grants) and not c.read_only
    return Access(read, write, owner, _why(c, owner, grants, read, write), guest=True)


def _contains_another(c: _Cache, owners: _Owners) -> str:
    """Outside the homes (owned by name): why c's location, a parent of
    another namespace's, is no one's ("": it is not)."""
    if p.home_namespace(c.location.bucket, c.location.prefix) is not None:
        return ""
    inner = next((o for o in owners.below(c.location.prefix) if o.namespace != c.namespace), None)
    return "" if inner is None else (f"{c.location} contains ResultCache {inner.name}'s location {inner.location}: "
                                     "point spec.store.prefix below it or elsewhere")


def stalled_reason(access: Access) -> str:
    """The condition reason of a cache that may neither read nor write its location."""
    return p.REASON_LOCATION_REFUSED if not access.owner else p.REASON_LOCATION_OWNED


def basis(body: Body) -> tuple[str, str, str]:
    """What of a cache the decisions depend on: its store, its sharing and its age (a new
    object under the same name is another cache)."""
    spec = section(body, "spec")
    return canonical_json([spec.get("store"), spec.get("tiers")]).decode(), \
        canonical_json(spec.get("sharing")).decode(), cache(body).meta.creation_timestamp


def selects_by_labels(caches: Iterable[Body]) -> bool:
    """Some cache shares by namespaceSelector (only then are Namespace labels read)."""
    return any(section(section(section(c, "spec"), "sharing"), role).get("namespaceSelector") is not None
               for c in caches for role in ("readers", "writers"))


def _refused_location(c: _Cache) -> str:
    """Why the location can be no one's (empty: it can)."""
    if any(part in (".", "..") for part in c.location.prefix.split("/")):
        return f"spec.store.prefix {c.location.prefix!r} has a '.' or '..' segment: name the prefix plainly"
    if p.holds_every_home(c.location.bucket, c.location.prefix):
        return (f"{c.location} holds every namespace's results: use a prefix under "
                f"{p.default_store_prefix(c.namespace)} (spec.store.prefix)")
    return ""


def _owner(c: _Cache, owners: _Owners) -> str:
    home = p.home_namespace(c.location.bucket, c.location.prefix)
    if home is not None:   # a namespace's home is its own, whoever came first
        return home
    overlapping = owners.containing(c.location.prefix) + owners.below(c.location.prefix)
    return min(overlapping, key=lambda o: o.age).namespace if overlapping else c.namespace


def _why(c: _Cache, owner: str, grants: Sequence[_Cache], read: bool, write: bool) -> str:
    holder = f"ResultCache {grants[0].name}" if grants else f"a ResultCache in namespace {owner}"
    missing = [role for role, allowed in (("readers", read), ("writers", write)) if not allowed]
    if c.read_only and "writers" in missing:
        missing.remove("writers")
    if not missing:
        return ""
    home = f"bucket {p.DEFAULT_BUCKET} prefix {p.default_store_prefix(c.namespace)}"
    return (f"{c.location} is owned by namespace {owner} ({holder}): {c.namespace} may not "
            f"{' or '.join('read' if r == 'readers' else 'write' for r in missing)} there; ask namespace {owner} "
            f"to list {c.namespace} in {holder} spec.sharing.{' and '.join(missing)}, or point spec.store at "
            f"{home}")


def _lists(sharing: Mapping[str, Any], role: str, namespace: str, labels: Labels) -> bool:
    """`sharing.<role>` names `namespace` or selects it by its labels."""
    allowed = section(sharing, role)
    if namespace in (allowed.get("namespaces") or ()):
        return True
    selector = allowed.get("namespaceSelector")
    return isinstance(selector, Mapping) and namespace in labels and selects(selector, labels[namespace])


def upstream_denied(upstream: Ref, cache_name: str, upstream_cache: Body | None, reader: str, labels: Labels) -> str:
    """Why a job of namespace `reader` may not take the result of ComputeJob `upstream` (of another
    namespace) as input ("": it may: the upstream's ResultCache lists it in spec.sharing.readers)."""
    namespace, name = upstream
    holder = f"ResultCache {namespace}/{cache_name}"
    if upstream_cache is None:
        return f"ComputeJob {namespace}/{name} names {holder}, which does not exist: nothing is shared"
    if _lists(section(section(upstream_cache, "spec"), "sharing"), "readers", reader, labels):
        return ""
    return (f"ComputeJob {namespace}/{name} stores its results through {holder}, which does not list {reader} in "
            f"spec.sharing.readers: ask namespace {namespace} to list it, or compute the input in {reader}")


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A Kubernetes LabelSelector (matchLabels and matchExpressions) over `labels`; an empty
    selector selects everything, as Kubernetes'."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    return all(_matches(e, labels) for e in selector.get("matchExpressions") or ())


def _matches(expression: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    key, op, values = str(expression.get("key")), expression.get("operator"), expression.get("values") or ()
    if op == "In":
        return key in labels and labels[key] in values
    if op == "NotIn":
        return key not in labels or labels[key] not in values
    if op == "Exists":
        return key in labels
    return op == "DoesNotExist" and key not in labels
