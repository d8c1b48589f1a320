"""The LXD lab's pieces that need no daemon: the image's cache key and cache, the
cgroups a killed container leaves."""

import os
import time

import pytest

from zfast.lab import lxd


def test_the_image_key_follows_its_inputs(tmp_path, monkeypatch):
    sources = tmp_path / "debian.sources"
    sources.write_text("URIs: http://deb.debian.org/debian\n")
    monkeypatch.setattr(lxd, "DEB_SOURCES", sources)
    key = lxd.image_key()
    assert key == lxd.image_key()
    assert lxd.image_key(packages=lxd.IMAGE_PACKAGES + ("haproxy",)) != key
    assert lxd.image_key(suite="trixie") != key
    sources.write_text("URIs: http://snapshot.debian.org/archive/debian/20260101T000000Z\n")
    assert lxd.image_key() != key
    monkeypatch.setattr(lxd, "IMAGE_VERSION", lxd.IMAGE_VERSION + 1)
    assert lxd.image_key() != key


def test_a_cached_image_is_found_without_a_build(tmp_path, monkeypatch):
    key = lxd.image_key()
    (tmp_path / key).mkdir()
    (tmp_path / key / "meta.tar.gz").write_bytes(b"m")
    (tmp_path / key / "rootfs.tar").write_bytes(b"r")
    monkeypatch.setattr(lxd, "install", lambda *a: (_ for _ in ()).throw(AssertionError("built")))
    img = lxd.build_image(cache=tmp_path)
    assert img.alias == f"zfast-{key}" and img.rootfs == tmp_path / key / "rootfs.tar"


def test_remove_cgroups_takes_only_the_named_containers_empty_groups(tmp_path):
    for d in ("cpu/lxc.payload.a", "cpu/lxc.payload.a-1/.lxc", "cpu/lxc.monitor.a",
              "cpu/lxc.payload.ab", "cpu/lxc.payload.a-x", "memory/lxc.payload.b",
              "memory/lxc.pivot", "lxc.payload.a/.lxc"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "memory" / "lxc.payload.a").mkdir()
    (tmp_path / "memory" / "lxc.payload.a" / "cgroup.procs").write_text("1\n")   # "busy"
    removed = lxd.remove_cgroups(["a"], root=tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in removed) == [
        "cpu/lxc.monitor.a", "cpu/lxc.payload.a", "cpu/lxc.payload.a-1", "lxc.payload.a"]
    for kept in ("cpu/lxc.payload.ab", "cpu/lxc.payload.a-x", "memory/lxc.payload.b",
                 "memory/lxc.pivot", "memory/lxc.payload.a"):
        assert (tmp_path / kept).exists(), kept
    assert lxd.remove_cgroups([], root=tmp_path, pivot=True) == [tmp_path / "memory/lxc.pivot"]


def test_an_image_build_prunes_only_builds_unused_for_a_while(tmp_path):
    now = time.time()
    for name, age in (("keep", 30 * 86400), ("recent", 3600), ("old", lxd.IMAGE_KEEP_S + 60),
                      (".half.tmp", 0)):
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (now - age, now - age))
    removed = lxd.prune_images(tmp_path, keep="keep", now=now)
    assert sorted(p.name for p in removed) == [".half.tmp", "old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "recent"]


def test_a_cache_hit_marks_the_build_used(tmp_path, monkeypatch):
    key = lxd.image_key()
    (tmp_path / key).mkdir()
    (tmp_path / key / "meta.tar.gz").write_bytes(b"m")
    (tmp_path / key / "rootfs.tar").write_bytes(b"r")
    os.utime(tmp_path / key, (1, 1))
    lxd.build_image(cache=tmp_path)
    assert time.time() - (tmp_path / key).stat().st_mtime < 60


def test_the_image_has_haproxy_for_routers():
    assert "haproxy" in lxd.IMAGE_PACKAGES


def test_the_client_waits_for_a_cluster_s_operation_keeping_its_query(tmp_path, monkeypatch):
    asked = []
    client = lxd.Client(tmp_path / "s")
    monkeypatch.setattr(client, "request", lambda method, path, body=None, wait=True,
                        timeout=None: asked.append(path) or {"status_code": 200})
    client.wait("/1.0/operations/abc?project=default", timeout=7)
    client.wait("/1.0/operations/def", timeout=7)
    assert asked == ["/1.0/operations/abc/wait?timeout=7&project=default",
                     "/1.0/operations/def/wait?timeout=7"]
    monkeypatch.setattr(client, "request", lambda *a, **k: {"status_code": 400, "err": "no"})
    with pytest.raises(lxd.LxdError, match="no"):
        client.wait("/1.0/operations/x")
