"""resolve.Lookups over the API server and the job's store: what resolving a ComputeJob
reads (upstream jobs and their results, ConfigMaps, objects, GMemSeeds and their overlays)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from memoplane.cas import Store
from memoplane.cluster import objectinputs, resolve
from memoplane.cluster import protocol as p
from memoplane.cluster.kube import Kube
from memoplane.cluster.stores import Stores
from memoplane.errors import MemoplaneError, NotFound, StoreCorrupted
from memoplane.jobs import BlobInput, Input, JsonInput
from memoplane.settings import ObjectGrant

from .caches import ResultCaches


class Lookups:
    def __init__(self, kube: Kube, stores: Stores, namespace: str, store: Store, caches: ResultCaches,
                 object_grants: tuple[ObjectGrant, ...]) -> None:
        self.kube, self.stores, self.namespace, self.store, self.caches = kube, stores, namespace, store, caches
        self.object_grants = object_grants

    def get_job(self, name: str) -> Mapping[str, Any] | None:
        return self.kube.get(p.COMPUTEJOBS, self.namespace, name)

    def foreign_job(self, namespace: str, name: str) -> tuple[Mapping[str, Any] | None, str]:
        found = self.kube.get(p.COMPUTEJOBS, namespace, name)
        return found, self.caches.reader_denied(found, self.namespace) if found is not None else ""

    def get_config_map(self, name: str) -> Mapping[str, Any] | None:
        return self.kube.get_config_map(self.namespace, name)

    def result_input(self, result_digest: str, store_url: str | None) -> Input:
        source = self.stores.by_url(store_url) if store_url else self.store
        try:
            value = source.get_result(result_digest).value
            if value.blob is None:
                return JsonInput(value.inline)
            if value.kind == "json":
                return JsonInput(json.loads(source.get_bytes(value.blob.digest)))
            ref = self.store.copy_blob(source, value.blob.digest)  # streamed; the job's own store: present, sealed
            return BlobInput(ref.digest, ref.size)
        except (NotFound, StoreCorrupted) as exc:
            raise resolve.LookupError_("UpstreamResultUnavailable", str(exc)) from None
        except MemoplaneError as exc:
            raise resolve.LookupError_(p.REASON_STORE, str(exc)) from None

    def object_refusal(self, bucket: str, key: str) -> str | None:
        return objectinputs.refusal(self.object_grants, self.namespace, bucket, key, self.caches.result_buckets())

    def object_input(self, bucket: str, key: str) -> BlobInput | None:
        try:
            stream = self.stores.open_object(bucket, key)
            if stream is None:
                return None
            with stream:
                ref = self.store.put_stream(stream)
        except MemoplaneError as exc:
            raise resolve.LookupError_(p.REASON_STORE, str(exc)) from None
        return BlobInput(ref.digest, ref.size)

    def put_bytes(self, data: bytes) -> BlobInput:
        ref = self.store.put_bytes(data)
        return BlobInput(ref.digest, ref.size)

    def stored_blob(self, digest: str) -> BlobInput | None:
        """A blob uploaded for this namespace (fromBlob): in the job's store, or in the namespace's
        home (where `memoplane submit` uploads), copied into the job's store chunk by chunk."""
        home = self.stores.get(p.DEFAULT_BUCKET, p.default_store_prefix(self.namespace))
        try:
            for source in dict.fromkeys((self.store, home)):
                try:
                    source.blob_manifest(digest)
                except NotFound:
                    continue
                ref = self.store.copy_blob(source, digest)
                return BlobInput(ref.digest, ref.size)
            return None
        except StoreCorrupted as exc:
            raise resolve.LookupError_("BlobUnavailable", str(exc)) from None
        except MemoplaneError as exc:
            raise resolve.LookupError_(p.REASON_STORE, str(exc)) from None

    def get_seed(self, name: str) -> Mapping[str, Any] | None:
        return self.kube.get(p.GMEMSEEDS, self.namespace, name)

    def seed_overlay(self, digest: str, store_url: str) -> BlobInput:
        """A seed's overlay blob as a blob in the job's store (copied when the stores differ)."""
        try:
            ref = self.store.copy_blob(self.stores.by_url(store_url), digest)
            return BlobInput(ref.digest, ref.size)
        except (NotFound, StoreCorrupted) as exc:
            raise resolve.LookupError_("SeedOverlayUnavailable", str(exc)) from None
        except (MemoplaneError, ValueError) as exc:
            raise resolve.LookupError_(p.REASON_STORE, str(exc)) from None
