"""The Kubernetes rehearsal's users and volume ownership (tests/deploy/k8s_rehearsal.py): who a
container runs as, and how its volumes are owned, as the kubelet would leave them. The rehearsal
itself (test_k8s_rehearsal.py) checks its running pods; these check the parts on their own."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest

from tests.deploy.k8s_rehearsal import Container, _setpriv, own_volume, run_as
from tests.deploy.rehearsal import assert_runs_as, restore_modes, searchable

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown and setpriv to another user need root")


def test_the_containers_user_overrides_the_pods_and_the_fs_group_joins_the_groups():
    pod = {"runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 2000, "supplementalGroups": [3000, 2000]}
    assert run_as(pod, {}, "p/c") == (10001, 10001, [2000, 3000, 10001])
    assert run_as(pod, {"runAsUser": 472, "runAsGroup": 0}, "p/c") == (472, 0, [0, 2000, 3000])
    assert run_as({"runAsUser": 1, "runAsGroup": 2}, {}, "p/c") == (1, 2, [2])


def test_a_container_without_a_user_is_refused_not_run_as_root():
    with pytest.raises(AssertionError, match="p/c: no runAsUser"):
        run_as({"runAsGroup": 10001}, {}, "p/c")


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@as_root
def test_with_an_fs_group_a_volume_is_group_owned_and_writable_unless_read_only(tmp_path):
    claim = tmp_path / "claim"
    (claim / "sub").mkdir(parents=True)
    (claim / "sub" / "file").write_text("x")
    (claim / "sub" / "file").chmod(0o600)
    own_volume(claim, 2000, read_only=False, kind="persistentVolumeClaim")
    for path in (claim, claim / "sub", claim / "sub" / "file"):
        assert path.stat().st_gid == 2000 and path.stat().st_uid == 0, path
    assert _mode(claim / "sub" / "file") == 0o660
    assert _mode(claim / "sub") & 0o2070 == 0o2070   # setgid, group rwx

    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key").write_text("s")
    (secret / "key").chmod(0o400)
    own_volume(secret, 2000, read_only=True, kind="secret")
    assert _mode(secret / "key") == 0o440 and (secret / "key").stat().st_gid == 2000


@as_root
def test_without_an_fs_group_a_claim_is_left_as_it_is_and_an_empty_dir_is_open(tmp_path):
    claim, empty = tmp_path / "claim", tmp_path / "empty"
    claim.mkdir(mode=0o700)
    (claim / "file").write_text("x")
    (claim / "file").chmod(0o600)
    empty.mkdir(mode=0o755)
    own_volume(claim, None, read_only=False, kind="persistentVolumeClaim")
    own_volume(empty, None, read_only=False, kind="emptyDir")
    assert _mode(claim) == 0o700 and _mode(claim / "file") == 0o600 and claim.stat().st_gid == 0
    assert _mode(empty) == 0o777


@as_root
def test_a_link_in_a_volume_is_chowned_but_its_target_keeps_its_mode(tmp_path):
    volume, outside = tmp_path / "volume", tmp_path / "outside"
    volume.mkdir()
    outside.write_text("x")
    outside.chmod(0o600)
    (volume / "link").symlink_to(outside)
    own_volume(volume, 2000, read_only=True, kind="secret")
    assert (volume / "link").lstat().st_gid == 2000
    assert _mode(outside) == 0o600 and outside.stat().st_gid == 0


@as_root
@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs util-linux's setpriv")
def test_setpriv_runs_the_process_as_the_containers_user_without_capabilities(tmp_path):
    volume = tmp_path / "a" / "b" / "volume"
    volume.mkdir(parents=True)
    tmp_path.chmod(0o700)   # as pytest makes its folders: the user could not reach the volume
    opened: list = []
    searchable(volume, opened)
    assert (tmp_path, 0o700) in opened
    own_volume(volume, 2000, read_only=False, kind="emptyDir")
    container = Container("c", [], {}, {}, uid=10001, gid=10001, groups=[2000], drop_all_capabilities=True,
                          no_new_privs=True)
    script = f'exec {_setpriv(container)} "$@"'
    process = subprocess.Popen(["sh", "-c", script, "c", "sh", "-c", 'touch "$0/written" && exec sleep 30',
                                str(volume)])
    try:
        for _ in range(100):   # until the shell has exec'd into sleep (its file written)
            if (volume / "written").exists():
                break
            subprocess.run(["sleep", "0.05"])
        assert_runs_as("c", process.pid, 10001, 10001, [2000], no_capabilities=True, no_new_privs=True)
        written = volume / "written"
        assert written.stat().st_uid == 10001 and written.stat().st_gid == 2000   # setgid folder
    finally:
        process.kill()
        process.wait()
    outside = subprocess.run(["sh", "-c", f'exec {_setpriv(container)} "$@"', "c", "touch", str(tmp_path / "no")],
                             capture_output=True, text=True)
    assert outside.returncode != 0 and not (tmp_path / "no").exists()
    restore_modes(opened)
    assert _mode(tmp_path) == 0o700 and opened == []
