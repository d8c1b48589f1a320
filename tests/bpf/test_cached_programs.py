"""The program cache against the real kernel (needs root): a miss compiles and writes, a hit in
a fresh process loads the same program without mapping LLVM (and attaches it), pinned maps
are adopted from bpffs on a hit, and the tables of a hit look like BCC's own.

The packet tests (test_packets.py) run against a cached program as well: see conftest.py.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from zfast.dataplane import bpflib, progcache
from zfast.dataplane.loader import Loaded, Sizes, map_sizes
from zfast.dataplane.progrun import run_xdp
from zfast.paths import BPFFS, ensure_bpffs

REPO = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter: Loaded(), then everything the daemon does with it, and what
# the process has mapped at the end.
CHILD = r"""
import ctypes, json, os, sys, time
t0 = time.monotonic()
from zfast.dataplane.loader import Loaded, attached_prog, detach_interface
dp = Loaded()
load_s = time.monotonic() - t0
out = {"cache": dp.cache, "load_s": load_s, "prog_id": dp.prog_id}
# the tables the control plane uses, one of each kind
dp.update_config(sync=0, fw_gen=7)
out["config"] = dp.config().fw_gen
flows = dp.table("flows")
k, v = flows.Key(), flows.Leaf()
from zfast.dataplane.flowage import FORWARD
k.sport, v.port, v.dir = 1234, 80, FORWARD
flows[k] = v
out["flows"] = [(key.sport, flows[key].port) for key in flows.keys()]
from zfast.controllers.statistics import count_entries   # batch reads (zfast.dataplane.mapbatch)
from zfast.dataplane.flowage import sweep                          # batch updates and deletes
out["count"] = count_entries(flows.map_fd)
out["sweep"] = [sweep(flows)["aged"], sweep(flows)["deleted"], len(list(flows.keys()))]
flows[k] = v
del flows[k]
out["flows_after_delete"] = len(list(flows.keys()))
dp.write_ring(0, [3] * dp.sizes.maglev_size)
out["ring"] = int(dp.read_ring(0)[dp.sizes.maglev_size - 1])
out["percpu"] = dp.percpu_sum("reason_stats", 0)
dp.set_tx_ports([1])
out["devmap"] = dp.table("tx_ports")[ctypes.c_int(1)].value
dp.bpf[b"flow_events"].open_ring_buffer(lambda ctx, data, size: 0)
dp.bpf.ring_buffer_poll(0)
# attach where it cannot disturb anything: a veth in a namespace of its own
att = dp.attach("zfc0", "generic")
out["attached"] = [att.mode, att.prog_id, list(attached_prog("zfc0"))]
detach_interface("zfc0")
out["detached"] = attached_prog("zfc0")
att = dp.attach("zfc0", "tc")
out["tc"] = [att.mode, att.prog_id == dp.tc_prog_id, list(attached_prog("zfc0"))]
detach_interface("zfc0")
out["tc_detached"] = attached_prog("zfc0")
maps = open("/proc/self/maps").read()
out["llvm_mapped"] = [lib for lib in ("libLLVM", "libclang", "libbcc.so") if lib in maps]
out["bcc_imported"] = sorted(m for m in sys.modules if m == "bcc" or m.startswith("bcc."))
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
out["rss_kib"] = int(status["VmRSS"].split()[0])
out["hwm_kib"] = int(status["VmHWM"].split()[0])
print(json.dumps(out))
"""


@pytest.fixture
def netns():
    """A namespace with a veth pair zfc0/zfc1, for the child to attach to zfc0."""
    name = f"zfcache-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "zfc0", "type", "veth", "peer", "name",
                        "zfc1"], check=True)
        for link in ("zfc0", "zfc1"):
            subprocess.run(["ip", "-n", name, "link", "set", link, "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def child(ns: str, cache: Path) -> dict:
    env = {**os.environ, "ZFAST_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CHILD], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_a_miss_then_a_hit_in_a_fresh_process_without_llvm(tmp_path, netns):
    cache = tmp_path / "cache"
    miss = child(netns, cache)
    assert miss["cache"] == "miss"
    assert [e["valid"] for e in progcache.list_entries(cache)] == [True]
    hit = child(netns, cache)
    print(f"\nLoaded(): miss {miss['load_s']:.2f} s, RSS {miss['rss_kib'] >> 10} MiB "
          f"(peak {miss['hwm_kib'] >> 10}); hit {hit['load_s']:.2f} s, RSS "
          f"{hit['rss_kib'] >> 10} MiB (peak {hit['hwm_kib'] >> 10})")
    assert hit["cache"] == "hit"
    assert hit["llvm_mapped"] == [] and hit["bcc_imported"] == []
    assert "libLLVM" in miss["llvm_mapped"]      # the check would see it
    for result in (miss, hit):
        assert result["config"] == 7
        assert result["flows"] == [[1234, 80]] and result["flows_after_delete"] == 0
        assert result["count"] == [1, 65536] and result["sweep"] == [1, 1, 0]
        assert result["ring"] == 3 and result["percpu"] == [0, 0] and result["devmap"] == 1
        assert result["attached"] == ["generic", result["prog_id"], [result["prog_id"], "generic"]]
        assert result["detached"] is None
        assert result["tc"] == ["tc", True, [result["tc"][2][0], "tc"]] and result["tc_detached"] is None
    assert hit["prog_id"] != miss["prog_id"]
    assert hit["load_s"] < miss["load_s"]


def prog_map_ids(prog_id: int) -> set[int]:
    out = subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog_id)],
                         capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout)["map_ids"])


def bpf_fds() -> set[str]:
    """This process's open BPF map and program fds."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(("anon_inode:bpf-map",
                                                              "anon_inode:bpf-prog")):
                out.add(fd)
        except OSError:
            pass
    return out


def _ids(dp: Loaded) -> dict[str, int]:
    return {m.name: bpflib.map_info(dp.table(m.name).map_fd).id
            for m in dp.bpf.entry.maps} if dp.cache == "hit" else {}


def _pinned_id(path: Path) -> int:
    fd = bpflib.lib.bpf_obj_get(str(path).encode())
    assert fd >= 0, path
    try:
        return bpflib.map_info(fd).id
    finally:
        os.close(fd)


@pytest.fixture
def pin_dir():
    ensure_bpffs()
    path = BPFFS / f"test-cache-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_hit_adopts_the_pinned_maps(tmp_path, monkeypatch, pin_dir):
    monkeypatch.setenv("ZFAST_CACHE_DIR", str(tmp_path / "cache"))
    first = Loaded(pin=pin_dir)
    assert first.cache == "miss"
    pinned = sorted(p.name for p in pin_dir.iterdir())
    assert "flows" in pinned and "config" in pinned
    assert "flow_events" not in pinned and "tx_ports" not in pinned   # not declared pinned
    flows = first.table("flows")
    key, value = flows.Key(), flows.Leaf()
    key.sport, value.port = 4321, 8080
    flows[key] = value
    first.update_config(fw_gen=42)
    first.bpf.cleanup()

    second = Loaded(pin=pin_dir)
    assert second.cache == "hit"
    ids = _ids(second)
    for name in pinned:
        assert ids[name] == _pinned_id(pin_dir / name), name
    assert second.config().fw_gen == 42
    got = second.table("flows")
    assert [(k.sport, got[k].port) for k in got.keys()] == [(4321, 8080)]
    # the program itself uses the adopted maps
    assert {ids["flows"], ids["config"]} <= prog_map_ids(second.prog_id)
    second.bpf.cleanup()

    # a pin that went is made again, the others still adopted
    (pin_dir / "frags").unlink()
    third = Loaded(pin=pin_dir)
    assert third.cache == "hit" and (pin_dir / "frags").exists()
    ids = _ids(third)
    assert ids["frags"] == _pinned_id(pin_dir / "frags")
    assert third.config().fw_gen == 42
    third.bpf.cleanup()


def test_another_pin_dir_is_the_same_entry_with_maps_of_its_own(tmp_path, monkeypatch, pin_dir):
    """The pin dir is no part of the key (it names where maps live, not what the program
    is): a spare and the node it becomes, or two nodes of one size, share an entry."""
    monkeypatch.setenv("ZFAST_CACHE_DIR", str(tmp_path / "cache"))
    first = Loaded(pin=pin_dir)
    assert first.cache == "miss"
    first.update_config(fw_gen=42)
    other = pin_dir.with_name(pin_dir.name + "-other")
    other.mkdir()
    try:
        second = Loaded(pin=other)
        assert second.cache == "hit"
        assert sorted(p.name for p in other.iterdir()) == sorted(p.name for p in pin_dir.iterdir())
        assert second.config().fw_gen == 0          # its own maps, not the first's
        ids = _ids(second)
        assert ids["flows"] == _pinned_id(other / "flows") != _pinned_id(pin_dir / "flows")
        # and BCC, compiling for the other dir, makes the same instructions
        monkeypatch.setenv("ZFAST_CACHE_DIR", "off")
        shutil.rmtree(other)
        other.mkdir()
        compiled = Loaded(pin=other)
        assert same_instructions(compiled, second)
        compiled.bpf.cleanup()
        second.bpf.cleanup()
    finally:
        first.bpf.cleanup()
        shutil.rmtree(other, ignore_errors=True)


def test_a_pinned_map_of_another_shape_is_not_adopted(tmp_path, monkeypatch, pin_dir):
    monkeypatch.setenv("ZFAST_CACHE_DIR", str(tmp_path / "cache"))
    Loaded(pin=pin_dir).bpf.cleanup()
    entry = progcache.read_entry(tmp_path / "cache", progcache.list_entries(tmp_path / "cache")[0]["key"])
    vips = next(m for m in entry.maps if m.name == "vips")
    (pin_dir / "vips").unlink()
    fd = bpflib.lib.bcc_create_map(vips.type, b"vips", vips.key_size, vips.value_size,
                                   vips.max_entries * 2, vips.flags)
    assert fd >= 0 and bpflib.lib.bpf_obj_pin(fd, str(pin_dir / "vips").encode()) == 0
    os.close(fd)
    before = bpf_fds()
    with pytest.raises(progcache.HitError, match="vips"):
        progcache.instantiate(entry, pin_dir)
    assert bpf_fds() == before           # nothing the refused attempt opened stays open


def same_instructions(compiled: Loaded, cached: Loaded) -> bool:
    """BCC's instructions and the cache's, the map fds in them aside."""
    for p in cached.bpf.entry.programs:
        a = bytearray(compiled.bpf.dump_func(p.name.encode()))
        b = bytearray(cached.bpf.dump_func(p.name.encode()))
        for index, _ in p.refs:
            a[index * 8 + 4:index * 8 + 8] = b[index * 8 + 4:index * 8 + 8] = bytes(4)
        if a != b:
            return False
    return True


def _layout(t) -> object:
    if hasattr(t, "_fields_"):
        return (ctypes.sizeof(t), [(f[0], getattr(t, f[0]).offset, _layout(f[1]))
                                   for f in t._fields_])
    if hasattr(t, "_length_"):
        return (ctypes.sizeof(t), t._length_, _layout(t._type_))
    return (ctypes.sizeof(t), t.__name__)


def test_the_tables_of_a_hit_are_bccs_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("ZFAST_CACHE_DIR", "off")
    compiled = Loaded()
    monkeypatch.setenv("ZFAST_CACHE_DIR", str(tmp_path / "cache"))
    Loaded().bpf.cleanup()
    cached = Loaded()
    assert (compiled.cache, cached.cache) == ("off", "hit")
    try:
        for m in cached.bpf.entry.maps:
            a, b = compiled.table(m.name), cached.table(m.name)
            assert type(a).__name__ == type(b).__name__, m.name
            assert _layout(a.Key) == _layout(b.Key), m.name
            assert _layout(a.Leaf) == _layout(b.Leaf), m.name
            assert (a.max_entries, a.flags, a.ttype) == (b.max_entries, b.flags, b.ttype), m.name
            ia, ib = bpflib.map_info(a.map_fd), bpflib.map_info(b.map_fd)
            assert (ia.type, ia.key_size, ia.value_size, ia.max_entries, ia.map_flags) == \
                (ib.type, ib.key_size, ib.value_size, ib.max_entries, ib.map_flags), m.name
        assert same_instructions(compiled, cached)
    finally:
        compiled.bpf.cleanup()
        cached.bpf.cleanup()


TWO_PROGRAMS = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
BPF_ARRAY(hits, u64, 2);
BPF_HASH(seen, u32, u32, 16);
int xdp_two(struct xdp_md *ctx) {
    int k = 0;
    u64 *v = hits.lookup(&k);
    if (v) __sync_fetch_and_add(v, 1);
    return XDP_PASS;
}
int tc_two(struct __sk_buff *skb) {
    int k = 1;
    u64 *v = hits.lookup(&k);
    if (v) __sync_fetch_and_add(v, 1);
    u32 key = skb->len, one = 1;
    seen.update(&key, &one);
    return TC_ACT_OK;
}
"""


def test_programs_of_two_types_from_one_source(tmp_path):
    """The list of (function, type) a source is loaded as: an XDP and a sched_cls program
    (what bpf/hook.h makes of zfast.c), sharing their maps, from a miss and from a hit."""
    programs = [("xdp_two", progcache.XDP), ("tc_two", progcache.SCHED_CLS)]
    results = []
    for want in ("miss", "hit"):
        got = progcache.load(TWO_PROGRAMS, ["-Wno-unused-function"], programs,
                             directory=tmp_path / "cache")
        assert got.status == want
        try:
            types = {name: json.loads(subprocess.run(
                ["bpftool", "-j", "prog", "show", "id", fd_prog_id(fn.fd)],
                capture_output=True, text=True, check=True).stdout)["type"]
                for name, fn in got.funcs.items()}
            assert types == {"xdp_two": "xdp", "tc_two": "sched_cls"}
            tc_maps = prog_map_ids(int(fd_prog_id(got.funcs["tc_two"].fd)))
            xdp_maps = prog_map_ids(int(fd_prog_id(got.funcs["xdp_two"].fd)))
            assert xdp_maps < tc_maps          # hits is shared, seen is tc's only
            assert run_xdp(got.funcs["xdp_two"].fd, bytes(64)).action == "pass"
            hits = got.bpf[b"hits"]
            results.append((hits[hits.Key(0)].value, type(hits).__name__))
        finally:
            got.bpf.cleanup()
    assert results == [(1, "Array"), (1, "Array")]


def fd_prog_id(fd: int) -> str:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return next(line.split()[1] for line in f if line.startswith("prog_id"))


def test_two_daemons_starting_together_compile_once(tmp_path):
    """A core starts its pair and spare at once: on a cold cache one compiles, the other
    waits for the dir's compile lock and loads the entry."""
    env = {**os.environ, "ZFAST_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    code = "from zfast.dataplane.loader import Loaded; print(Loaded().cache)"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert sorted(out.split()[-1] for out, _ in outs) == ["hit", "miss"]


def test_new_sizes_load_the_cached_program_with_maps_of_those_sizes(tmp_path, monkeypatch):
    """Sizes that only size maps (a flow table the scaling controller grew, more rules) are
    no recompile: the same entry, its maps made at the new sizes. The Maglev table size is
    in the instructions (a modulo), so a new one compiles. A start loads the programs of
    the hooks it uses; another loads when it is first needed."""
    monkeypatch.setenv("ZFAST_CACHE_DIR", str(tmp_path / "cache"))
    first = Loaded(Sizes(), hooks=["xdp"])
    assert (first.cache, first.loaded_hooks) == ("miss", ["xdp"])
    first.bpf.cleanup()
    grown = Sizes(flow_table=262144, max_services=16, max_backends=256, max_ifindex=1024,
                  max_public_ports=64, max_rules=4096, rate_table=2048)
    dp = Loaded(grown, hooks=["tc"])
    try:
        assert (dp.cache, dp.loaded_hooks) == ("hit", ["tc"])
        made = {name: bpflib.map_info(dp.table(name).map_fd).max_entries
                for name in map_sizes(grown)}
        assert made == map_sizes(grown)
        assert made["flows"] == 262144 and made["rule_stats"] == 4096
        assert made["rate_state"] == 2048
        # the maps carry the compile's BTF: bpftool prints their entries by field
        flows = dp.table("flows")
        k, v = flows.Key(), flows.Leaf()
        k.sport, v.port = 1234, 80
        flows[k] = v
        info = bpflib.map_info(flows.map_fd)
        assert info.btf_id and info.btf_key_type_id and info.btf_value_type_id
        dump = json.loads(subprocess.run(["bpftool", "-j", "map", "dump", "id", str(info.id)],
                                         capture_output=True, text=True, check=True).stdout)
        assert dump[0]["formatted"]["key"]["sport"] == 1234
        # the XDP program, first asked for here, loads against the same maps
        assert run_xdp(dp.prog_fd, bytes(64)).action in ("pass", "drop")
        assert dp.loaded_hooks == ["tc", "xdp"]
        flows_id = bpflib.map_info(dp.table("flows").map_fd).id
        assert flows_id in prog_map_ids(dp.prog_id) & prog_map_ids(dp.tc_prog_id)
        assert len(progcache.list_entries(tmp_path / "cache")) == 1
    finally:
        dp.bpf.cleanup()
    other = Loaded(Sizes(maglev_size=251), hooks=["xdp"])
    try:
        assert other.cache == "miss"
        assert len(progcache.list_entries(tmp_path / "cache")) == 2
    finally:
        other.bpf.cleanup()


def test_cache_warm_compiles_once_and_the_next_start_is_a_hit(tmp_path, monkeypatch, pin_dir):
    """`zfast cache warm` (what `zfast core up` runs before its balancers) compiles into
    the cache in a process of its own; a start after it, pinning elsewhere, loads it."""
    cache = tmp_path / "cache"
    env = {**os.environ, "ZFAST_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}

    def warm() -> dict:
        out = subprocess.run([sys.executable, "-m", "zfast.cli", "cache", "warm", "--json"],
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    first, second = warm(), warm()
    assert (first["status"], second["status"]) == ("miss", "hit") and first["key"] == second["key"]
    assert not [p for p in BPFFS.iterdir() if p.name.startswith("warm-")], "warm left pins"
    monkeypatch.setenv("ZFAST_CACHE_DIR", str(cache))
    dp = Loaded(pin=pin_dir)
    try:
        assert dp.cache == "hit" and dp._cache_key == first["key"]
    finally:
        dp.bpf.cleanup()
