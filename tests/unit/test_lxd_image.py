"""The LXD instance image's cache: its key, a hit without a build, pruning old builds."""

import os
import time

from zfast.core import lxdimage


def test_the_image_key_follows_its_inputs(tmp_path, monkeypatch):
    sources = tmp_path / "debian.sources"
    sources.write_text("URIs: http://deb.debian.org/debian\n")
    monkeypatch.setattr(lxdimage, "DEB_SOURCES", sources)
    key = lxdimage.image_key()
    assert key == lxdimage.image_key()
    assert lxdimage.image_key(packages=lxdimage.IMAGE_PACKAGES + ("haproxy",)) != key
    assert lxdimage.image_key(suite="trixie") != key
    sources.write_text("URIs: http://snapshot.debian.org/archive/debian/20260101T000000Z\n")
    assert lxdimage.image_key() != key
    monkeypatch.setattr(lxdimage, "IMAGE_VERSION", lxdimage.IMAGE_VERSION + 1)
    assert lxdimage.image_key() != key


def test_a_cached_image_is_found_without_a_build(tmp_path, monkeypatch):
    key = lxdimage.image_key()
    (tmp_path / key).mkdir()
    (tmp_path / key / "meta.tar.gz").write_bytes(b"m")
    (tmp_path / key / "rootfs.tar").write_bytes(b"r")
    monkeypatch.setattr(lxdimage, "install", lambda *a: (_ for _ in ()).throw(AssertionError("built")))
    img = lxdimage.build_image(cache=tmp_path)
    assert img.alias == f"zfast-{key}" and img.rootfs == tmp_path / key / "rootfs.tar"


def test_an_image_build_prunes_only_builds_unused_for_a_while(tmp_path):
    now = time.time()
    for name, age in (("keep", 30 * 86400), ("recent", 3600), ("old", lxdimage.IMAGE_KEEP_S + 60),
                      (".half.tmp", 0)):
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (now - age, now - age))
    removed = lxdimage.prune_images(tmp_path, keep="keep", now=now)
    assert sorted(p.name for p in removed) == [".half.tmp", "old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "recent"]


def test_a_cache_hit_marks_the_build_used(tmp_path, monkeypatch):
    key = lxdimage.image_key()
    (tmp_path / key).mkdir()
    (tmp_path / key / "meta.tar.gz").write_bytes(b"m")
    (tmp_path / key / "rootfs.tar").write_bytes(b"r")
    os.utime(tmp_path / key, (1, 1))
    lxdimage.build_image(cache=tmp_path)
    assert time.time() - (tmp_path / key).stat().st_mtime < 60


def test_the_image_has_haproxy_for_routers():
    assert "haproxy" in lxdimage.IMAGE_PACKAGES


