"""Store keys from a credentials directory (agents) or the environment (operator, tools)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from memoplane.cluster.stores import CREDENTIALS_ENV, StoreSettings, read_credentials
from memoplane.cluster.trust import load_signer
from memoplane.errors import InputError
from memoplane.settings import SigningSettings
from memoplane.testing import processes
from memoplane.trust import SigningKey

ENDPOINT = {"MEMOPLANE_S3_ENDPOINT": "http://127.0.0.1:9"}


def write_keys(directory: Path, access: str = "AKIA-test", secret: str = "s3cr3t", mode: int = 0o400) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, value in (("accessKey", access), ("secretKey", secret)):
        (directory / name).write_text(value + "\n")
        (directory / name).chmod(mode)
    return directory


def test_keys_are_read_from_the_directory(tmp_path: Path) -> None:
    settings = StoreSettings.from_env({**ENDPOINT, CREDENTIALS_ENV: str(write_keys(tmp_path / "keys"))})
    assert (settings.access_key, settings.secret_key) == ("AKIA-test", "s3cr3t")
    assert "s3cr3t" not in repr(settings) and "AKIA-test" not in repr(settings)


def test_a_secret_volume_layout_is_read_through_its_links(tmp_path: Path) -> None:
    """Kubernetes writes ..<timestamp>/<key>, links ..data to it and <key> to ..data/<key>."""
    volume = tmp_path / "store"
    write_keys(volume / "..2026_01_02_03_04_05.1")
    (volume / "..data").symlink_to("..2026_01_02_03_04_05.1")
    for name in ("accessKey", "secretKey"):
        (volume / name).symlink_to(f"..data/{name}")
    assert read_credentials(volume) == ("AKIA-test", "s3cr3t")


def test_the_variables_still_work_without_the_directory() -> None:
    settings = StoreSettings.from_env({**ENDPOINT, "MEMOPLANE_S3_ACCESS_KEY": "a", "MEMOPLANE_S3_SECRET_KEY": "b"})
    assert (settings.access_key, settings.secret_key) == ("a", "b")


@pytest.mark.parametrize(("mode", "shown"), [(0o644, "mode 0644"), (0o440, "mode 0440"), (0o602, "mode 0602")])
def test_keys_others_can_read_are_refused(tmp_path: Path, mode: int, shown: str) -> None:
    keys = write_keys(tmp_path / "keys", mode=mode)
    with pytest.raises(InputError) as caught:
        read_credentials(keys)
    message = str(caught.value)
    assert "\n" not in message and shown in message and CREDENTIALS_ENV in message
    assert f"chmod 0400 {keys / 'accessKey'}" in message


def test_a_missing_or_empty_key_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"cannot read .*/nowhere/accessKey \(No such file or directory\)"):
        read_credentials(tmp_path / "nowhere")
    keys = write_keys(tmp_path / "keys", secret="")
    with pytest.raises(InputError, match=r"secretKey is empty"):
        read_credentials(keys)


def test_keys_in_both_places_are_refused(tmp_path: Path) -> None:
    env = {**ENDPOINT, CREDENTIALS_ENV: str(write_keys(tmp_path / "keys")), "MEMOPLANE_S3_SECRET_KEY": "b"}
    with pytest.raises(InputError, match="unset the key variables"):
        StoreSettings.from_env(env)


def test_the_agent_refuses_to_start_with_readable_keys_in_one_line(tmp_path: Path) -> None:
    keys = write_keys(tmp_path / "keys", mode=0o644)
    env = {**os.environ, **ENDPOINT, "NODE_NAME": "n", CREDENTIALS_ENV: str(keys),
           "MEMOPLANE_S3_ACCESS_KEY": "", "MEMOPLANE_S3_SECRET_KEY": "", "MEMOPLANE_NODE_KEY_DIR": str(tmp_path / "nk")}
    proc = subprocess.run([sys.executable, "-m", "memoplane_agent"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("memoplane-agent: ") and "mode 0644" in line and "Traceback" not in proc.stderr


def test_local_agents_get_the_keys_as_private_files(tmp_path: Path) -> None:
    cfg = processes.StackConfig(directory=tmp_path / "stack",
                                env={**ENDPOINT, "MEMOPLANE_S3_ACCESS_KEY": "a", "MEMOPLANE_S3_SECRET_KEY": "b"})
    env = processes.agent_credentials(cfg)
    assert env["MEMOPLANE_S3_ACCESS_KEY"] == env["MEMOPLANE_S3_SECRET_KEY"] == ""
    directory = Path(env[CREDENTIALS_ENV])
    assert directory.stat().st_mode & 0o777 == 0o700
    assert {p.name: p.stat().st_mode & 0o777 for p in directory.iterdir()} == {"accessKey": 0o600, "secretKey": 0o600}
    assert StoreSettings.from_env({**ENDPOINT, **env}).secret_key == "b"
    assert processes.agent_credentials(processes.StackConfig(directory=tmp_path / "root-store", env={})) == {}


def test_the_signing_key_is_read_from_an_owner_only_file(tmp_path: Path) -> None:
    key = SigningKey.generate("mp-agents-1")
    path = tmp_path / "private.pem"
    path.write_bytes(key.pem())
    path.chmod(0o400)
    settings = SigningSettings(key_file=str(path), keyid="mp-agents-1")
    assert load_signer(settings).public == key.public
    path.chmod(0o644)
    with pytest.raises(InputError, match=r"MEMOPLANE_SIGNING_KEY_FILE: .* \(mode 0644\)"):
        load_signer(settings)
    with pytest.raises(InputError, match="must both be set"):
        load_signer(SigningSettings(key_file=str(path)))


def test_the_agent_refuses_to_start_without_its_node_key_directory(tmp_path: Path) -> None:
    env = {**os.environ, **ENDPOINT, "NODE_NAME": "n", CREDENTIALS_ENV: str(write_keys(tmp_path / "keys")),
           "MEMOPLANE_S3_ACCESS_KEY": "", "MEMOPLANE_S3_SECRET_KEY": "", "MEMOPLANE_NODE_KEY_DIR": ""}
    proc = subprocess.run([sys.executable, "-m", "memoplane_agent"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("memoplane-agent: MEMOPLANE_NODE_KEY_DIR is not set") and "Traceback" not in proc.stderr
