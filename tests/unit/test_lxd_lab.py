"""The LXD lab's pieces that need no daemon: the image's cache key and cache, the
cgroups a killed container leaves, the preseed documents and join token of a cluster, its
members' layout and the wait for a member's status."""

import base64
import json

import pytest

from zfast.lab import lxd


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


def test_the_first_member_is_preseeded_with_pool_profile_and_clustering():
    assert lxd.bootstrap_seed("m1", "127.0.0.2:28443") == {
        "config": {"core.https_address": "127.0.0.2:28443"},
        "storage_pools": [{"name": "default", "driver": "dir"}],
        "profiles": [{"name": "default", "devices": {
            "root": {"type": "disk", "path": "/", "pool": "default"}}}],
        "cluster": {"server_name": "m1", "enabled": True}}
    seed = lxd.bootstrap_seed("m1", "127.0.0.2:28443", driver="btrfs", pool_size="2GiB")
    assert seed["storage_pools"] == [{"name": "default", "driver": "btrfs",
                                      "config": {"size": "2GiB"}}]
    # not in the preseed: 5.0.2 fails a config PUT with it before clustering is on
    assert "cluster.offline_threshold" not in seed["config"]


def test_a_joining_member_gives_its_address_token_and_pool_keys():
    assert lxd.join_seed("m2", "127.0.0.3:28443", "TOKEN") == {"cluster": {
        "enabled": True, "server_name": "m2", "server_address": "127.0.0.3:28443",
        "cluster_token": "TOKEN",
        "member_config": [{"entity": "storage-pool", "name": "default", "key": "source",
                           "value": ""}]}}
    btrfs = lxd.join_seed("m3", "127.0.0.4:28443", "T", driver="btrfs", pool_size="2GiB")
    assert {(m["key"], m["value"]) for m in btrfs["cluster"]["member_config"]} == {
        ("source", ""), ("size", "2GiB")}


def test_the_join_token_is_the_token_operation_s_metadata_as_lxc_prints_it():
    meta = {"addresses": ["127.0.0.2:28443"], "expiresAt": "2026-12-05T00:56:15Z",
            "fingerprint": "50d4", "secret": "ebc1", "serverName": "m2"}
    assert json.loads(base64.b64decode(lxd.join_token(meta))) == {
        "server_name": "m2", "fingerprint": "50d4", "addresses": ["127.0.0.2:28443"],
        "secret": "ebc1", "expires_at": "2026-12-05T00:56:15Z"}
    del meta["expiresAt"]
    assert "expires_at" not in json.loads(base64.b64decode(lxd.join_token(meta)))


def test_the_offline_threshold_is_lxd_s_lowest():
    # 5.0.2 refuses 10: "Value must be greater than '10'"
    assert lxd.OFFLINE_THRESHOLD_S == 11
    assert lxd.CLUSTER_CONFIG["cluster.offline_threshold"] == "11"
    assert lxd.CLUSTER_CONFIG["cluster.images_minimal_replica"] == "-1"


def test_a_cluster_s_members_have_their_own_dirs_addresses_and_sockets(tmp_path):
    cl = lxd.Cluster(tmp_path / "c", size=3, port=28443, driver="btrfs")
    assert list(cl.daemons) == ["m1", "m2", "m3"]
    assert [(d.dir, d.address, d.driver) for d in cl.daemons.values()] == [
        (tmp_path / "c" / f"m{i}", f"127.0.0.{1 + i}:28443", "btrfs") for i in (1, 2, 3)]
    assert cl.sockets() == {f"m{i}": tmp_path / "c" / f"m{i}" / "unix.socket" for i in (1, 2, 3)}
    assert cl.socket_of("m2") == tmp_path / "c" / "m2" / "unix.socket"
    assert len(lxd.Cluster(tmp_path).daemons) == 3 and \
        lxd.Cluster(tmp_path).daemons["m1"].address == "127.0.0.2:8443"


def test_a_cluster_is_found_by_its_members_dirs(tmp_path):
    for d in ("m1", "m2", "m4", "mx", "other"):
        (tmp_path / d).mkdir()
    assert list(lxd.Cluster.found(tmp_path).daemons) == ["m1", "m2", "m3", "m4"]
    assert lxd.Cluster.found(tmp_path / "none").daemons == {}


def _views(cl, monkeypatch, live, views):
    """The cluster's members as each member would say, one answer after another."""
    asked = []
    monkeypatch.setattr(cl, "live", lambda: list(live))

    def members(via=None, timeout=10.0):
        asked.append(via)
        view = views.pop(0) if len(views) > 1 else views[0]
        if isinstance(view, Exception):
            raise view
        return [{"server_name": k, "status": v} for k, v in view.items()]
    monkeypatch.setattr(cl, "members", members)
    monkeypatch.setattr(lxd.time, "sleep", lambda s: None)
    return asked


def test_wait_status_asks_a_live_member_other_than_the_one_it_waits_for(tmp_path, monkeypatch):
    cl = lxd.Cluster(tmp_path)
    asked = _views(cl, monkeypatch, ["m1", "m3"], [
        {"m1": "Online", "m2": "Online", "m3": "Online"}, TimeoutError("no quorum"),
        {"m1": "Online", "m2": "Offline", "m3": "Online"}])
    assert cl.wait_status("m2", "Offline", timeout=5) >= 0
    assert asked == ["m1", "m1", "m1"]
    asked = _views(cl, monkeypatch, ["m1", "m3"], [{"m1": "Offline"}])
    cl.wait_status("m1", "Offline", timeout=5)
    assert asked == ["m3"]
    asked = _views(cl, monkeypatch, ["m2"], [{"m2": "Online"}])
    cl.wait_status("m2", "Online", timeout=5)       # only itself to ask
    assert asked == ["m2"]
    asked = _views(cl, monkeypatch, ["m1", "m2", "m3"], [{"m2": "Online"}])
    cl.wait_status("m2", "Online", timeout=5, via="m3")
    assert asked == ["m3"]


def test_wait_status_gives_up_saying_what_it_saw(tmp_path, monkeypatch):
    cl = lxd.Cluster(tmp_path)
    _views(cl, monkeypatch, ["m1"], [{"m1": "Online", "m2": "Online"}])
    with pytest.raises(TimeoutError, match="m2 not Offline in 0.2 s .via m1: .*'m2': 'Online'"):
        cl.wait_status("m2", "Offline", timeout=0.2)
