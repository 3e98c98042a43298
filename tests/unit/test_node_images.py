"""The node's OCI archives (node_images), the certificates it issues (pki.issue) and the
per-component build table (build): everything of `hack/cluster up --with-node` that needs no node."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from memoplane.testing import build, node, node_images, pki


def _members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        result = {}
        for member in tar.getmembers():
            data = tar.extractfile(member)
            assert data is not None
            result[member.name] = data.read()
    return result


def test_pause_archive_is_a_valid_oci_layout_with_the_same_digest_every_time(tmp_path: Path) -> None:
    first = node_images.pause_archive(tmp_path / "a").read_bytes()
    second_path = node_images.pause_archive(tmp_path / "b")
    assert second_path.read_bytes() == first
    files = _members(second_path)
    for name, blob in files.items():
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(blob).hexdigest() == name.rsplit("/", 1)[1]
    index = json.loads(files["index.json"])
    [entry] = index["manifests"]
    assert entry["annotations"]["io.containerd.image.name"] == node_images.PAUSE_IMAGE
    assert entry["platform"] == {"architecture": "amd64", "os": "linux"}
    manifest = json.loads(files[f"blobs/sha256/{entry['digest'].split(':')[1]}"])
    config = json.loads(files[f"blobs/sha256/{manifest['config']['digest'].split(':')[1]}"])
    [layer] = manifest["layers"]
    assert config["rootfs"]["diff_ids"] == [layer["digest"]]  # uncompressed: diff id = layer digest
    assert config["config"]["Entrypoint"] == ["/pause"]


def test_toolbox_has_a_shell_and_the_in_cluster_client(tmp_path: Path) -> None:
    files = _members(node_images.toolbox_archive(tmp_path))
    index = json.loads(files["index.json"])
    manifest = json.loads(files[f"blobs/sha256/{index['manifests'][0]['digest'].split(':')[1]}"])
    layer = files[f"blobs/sha256/{manifest['layers'][0]['digest'].split(':')[1]}"]
    (tmp_path / "layer.tar").write_bytes(layer)
    with tarfile.open(tmp_path / "layer.tar") as tar:
        names = {m.name: m for m in tar.getmembers()}
    assert names["bin/sh"].issym() and names["bin/sh"].linkname == "busybox"
    assert names["bin/whoami"].isfile() and names["bin/busybox"].isfile() and names["pause"].isfile()


def test_only_static_binaries_count_as_static(tmp_path: Path) -> None:
    assert node_images._is_static(node_images.BUSYBOX)
    assert not node_images._is_static(Path("/bin/ls"))
    (tmp_path / "text").write_text("#!/bin/sh\n")
    assert not node_images._is_static(tmp_path / "text")


def test_issued_client_certificate_names_user_and_group_and_serving_cert_names_ips(tmp_path: Path) -> None:
    pki.write_pki(tmp_path)
    crt, _ = pki.issue(tmp_path, "kubelet", "system:node:n", group="system:nodes")
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "system:node:n"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "system:nodes"
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    serving, _ = pki.issue(tmp_path, "serving", "n", serving_ips=["127.0.0.1"])
    sans = x509.load_pem_x509_certificate(serving.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["n"]


def test_every_component_has_a_version_a_builder_and_a_check() -> None:
    versions = build.load_versions()
    for component in build.COMPONENTS:
        assert versions.of(component).startswith("v"), component
        assert component in build._BUILDERS and component in build._VERSION_CHECKS, component
    assert versions.of("kubelet") == versions.of("kube-apiserver") == versions.kubernetes
    assert versions.of("ctr") == versions.of("containerd-shim-runc-v2") == versions.containerd


def test_import_refuses_a_name_without_a_tag_before_touching_containerd(tmp_path: Path) -> None:
    archive = node_images.pause_archive(tmp_path)
    with pytest.raises(node.NodeError, match="full name with a tag"):
        node._check_image_name("memoplane.local/pause")
    assert node._archive_digests(archive)[0].startswith("sha256:")


def test_node_ports_follow_the_control_plane_slot_without_overlap() -> None:
    ports = node.NodePorts.from_base(24000)
    assert ports.all() == [24012, 24013, 24014, 24015]
