"""The program cache's keys and entries, without root or a kernel: what makes a key, what
makes an entry unusable (corrupt, truncated, foreign, another format), that a miss compiles
and writes, a hit is used, a refused hit compiles again, and the dir stays bounded."""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import struct
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from zfast import cli
from zfast.dataplane import progcache as pc
from zfast.dataplane.bcctables import MapDef, decode_type

SOURCE = "int xdp_zfast(struct xdp_md *ctx) { return XDP_PASS; }\n"
CFLAGS = ["-DZF_FLOW_TABLE=65536", "-DZF_MAX_SERVICES=64"]
PROGRAMS = [("xdp_zfast", pc.XDP), ("tc_zfast", pc.SCHED_CLS)]
KERNEL = dict(release="6.18.0-test", kernel_version="#1 SMP test", bcc="0.26.0")


def ld_imm64(fd: int, src: int = 1) -> bytes:
    return struct.pack("<BBhi", 0x18, (src << 4) | 1, 0, fd) + struct.pack("<BBhi", 0, 0, 0, 0)


MOV_R0_2 = struct.pack("<BBhi", 0xb7, 0, 0, 2)
EXIT = struct.pack("<BBhi", 0x95, 0, 0, 0)


def program(name: str, ptype: int, fds: list[int]) -> bytes:
    """Instructions loading the maps of fds, then returning XDP_PASS."""
    return b"".join(ld_imm64(fd) for fd in fds) + MOV_R0_2 + EXIT


def make_entry(source: str = SOURCE, cflags=CFLAGS, **kernel) -> pc.Entry:
    material = pc.key_material(source, cflags, PROGRAMS, **{**KERNEL, **kernel})
    maps = [MapDef("flows", 9, 40, 52, 65536, 0, 0, '"unsigned int"', '"unsigned int"', None),
            MapDef("tx_ports", 14, 4, 4, 4096, 0, 128, '"unsigned int"', '"int"', None)]
    progs = [pc.Program("xdp_zfast", pc.XDP, program("xdp_zfast", pc.XDP, [7, 9, 7]),
                        [(0, "flows"), (2, "tx_ports"), (4, "flows")]),
             pc.Program("tc_zfast", pc.SCHED_CLS, program("tc_zfast", pc.SCHED_CLS, [9]),
                        [(0, "tx_ports")])]
    return pc.Entry(pc.cache_key(material), material, "GPL", 0, progs, maps)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("ZFAST_CACHE_DIR", str(d))
    return d


# ---- keys ---------------------------------------------------------------------------------


def test_the_key_follows_everything_a_compile_depends_on():
    base = pc.cache_key(pc.key_material(SOURCE, CFLAGS, PROGRAMS, **KERNEL))
    assert base == pc.cache_key(pc.key_material(SOURCE, list(CFLAGS), PROGRAMS, **KERNEL))
    changed = [
        pc.key_material(SOURCE + "\n", CFLAGS, PROGRAMS, **KERNEL),
        pc.key_material(SOURCE, CFLAGS[:1] + ["-DZF_MAX_SERVICES=128"], PROGRAMS, **KERNEL),
        pc.key_material(SOURCE, CFLAGS + ['-DZF_PIN_DIR="/run/zfast/bpffs/lb-a"'], PROGRAMS,
                        pin=Path("/run/zfast/bpffs/lb-a"), **KERNEL),
        pc.key_material(SOURCE, CFLAGS, PROGRAMS, **{**KERNEL, "release": "6.18.1-test"}),
        pc.key_material(SOURCE, CFLAGS, PROGRAMS, **{**KERNEL, "kernel_version": "#2 SMP"}),
        pc.key_material(SOURCE, CFLAGS, PROGRAMS, **{**KERNEL, "bcc": "0.29.1"}),
        pc.key_material(SOURCE, CFLAGS, PROGRAMS[:1], **KERNEL),
        pc.key_material(SOURCE, CFLAGS, [("xdp_zfast", pc.SCHED_CLS)], **KERNEL),
    ]
    keys = {pc.cache_key(m) for m in changed}
    assert base not in keys and len(keys) == len(changed)


def test_nodes_that_pin_their_maps_in_different_dirs_share_a_key():
    def key(pin):
        return pc.cache_key(pc.key_material(SOURCE, CFLAGS + [f'-DZF_PIN_DIR="{pin}"'], PROGRAMS,
                                            pin=Path(pin), **KERNEL))

    assert key("/run/zfast/bpffs/lb-a") == key("/run/zfast/bpffs/spare2")
    assert key("/run/zfast/bpffs/lb-a") != pc.cache_key(pc.key_material(SOURCE, CFLAGS, PROGRAMS,
                                                                        **KERNEL))


def test_the_key_includes_the_format(monkeypatch):
    before = pc.cache_key(pc.key_material(SOURCE, CFLAGS, PROGRAMS, **KERNEL))
    monkeypatch.setattr(pc, "FORMAT", pc.FORMAT + 1)
    assert pc.cache_key(pc.key_material(SOURCE, CFLAGS, PROGRAMS, **KERNEL)) != before


def test_the_running_kernel_is_in_the_key_by_default():
    m = pc.key_material(SOURCE, CFLAGS, PROGRAMS, bcc="x")
    assert m["release"] == os.uname().release and m["kernel_version"] == os.uname().version


# ---- entries --------------------------------------------------------------------------------


def test_an_entry_survives_encoding():
    e = make_entry()
    got = pc.decode(pc.encode(e), e.key)
    assert got == e


def test_a_flipped_byte_anywhere_in_the_body_is_refused():
    data = bytearray(pc.encode(make_entry()))
    for pos in (pc.HEADER.size, pc.HEADER.size + len(data) // 3, len(data) - 2):
        bad = bytearray(data)
        bad[pos] ^= 0x01
        with pytest.raises(pc.Invalid, match="checksum"):
            pc.decode(bytes(bad))


def test_a_flipped_byte_in_the_header_is_refused():
    data = pc.encode(make_entry())
    for pos in range(pc.HEADER.size):
        bad = bytearray(data)
        bad[pos] ^= 0x40
        with pytest.raises(pc.Invalid):
            pc.decode(bytes(bad))


@pytest.mark.parametrize("cut", [0, 5, pc.HEADER.size, pc.HEADER.size + 10, -1])
def test_a_truncated_entry_is_refused(cut):
    data = pc.encode(make_entry())
    with pytest.raises(pc.Invalid, match="truncated"):
        pc.decode(data[:cut])


def test_an_entry_of_another_key_is_refused():
    a, b = make_entry(), make_entry(source=SOURCE + "// b\n")
    with pytest.raises(pc.Invalid, match="entry of key"):
        pc.decode(pc.encode(a), b.key)


def test_an_entry_whose_key_is_not_its_materials_hash_is_refused():
    e = make_entry()
    e.material = {**e.material, "release": "5.10.0"}     # a key that lies about its source
    with pytest.raises(pc.Invalid, match="not the hash"):
        pc.decode(pc.encode(e))


def test_another_format_is_refused(monkeypatch):
    data = pc.encode(make_entry())
    monkeypatch.setattr(pc, "FORMAT", pc.FORMAT + 1)
    with pytest.raises(pc.Invalid, match="format"):
        pc.decode(data)


def test_a_map_reference_the_entry_does_not_name_is_refused():
    e = make_entry()
    e.programs[0].refs = e.programs[0].refs[:2]          # instruction 4 still carries an fd
    with pytest.raises(pc.Invalid, match="map references"):
        pc.decode(pc.encode(e))


def test_a_reference_to_an_instruction_that_is_no_map_load_is_refused():
    e = make_entry()
    e.programs[1].refs = [(0, "tx_ports"), (2, "tx_ports")]   # 2 is the mov
    with pytest.raises(pc.Invalid):
        pc.decode(pc.encode(e))


def test_a_reference_to_an_unknown_map_is_refused():
    e = make_entry()
    e.programs[1].refs = [(0, "nope")]
    with pytest.raises(pc.Invalid, match="unknown map"):
        pc.decode(pc.encode(e))


@pytest.mark.parametrize("pin", ["", "../flows", "/run/zfast/bpffs/x/flows", ".."])
def test_a_pin_outside_the_pin_dir_is_refused(pin):
    e = make_entry()
    e.maps[0].pin = pin
    with pytest.raises(pc.Invalid, match="pin"):
        pc.decode(pc.encode(e))


def test_programs_that_are_not_the_keys_are_refused():
    e = make_entry()
    e.programs = e.programs[:1]
    with pytest.raises(pc.Invalid, match="programs"):
        pc.decode(pc.encode(e))


def test_instructions_needing_btf_cannot_be_cached():
    with pytest.raises(pc.Uncacheable):
        pc.map_references(ld_imm64(3, src=3) + EXIT)           # BPF_PSEUDO_BTF_ID
    with pytest.raises(pc.Uncacheable):
        pc.map_references(struct.pack("<BBhi", 0x85, 2 << 4, 0, 7) + EXIT)   # kfunc call
    assert pc.map_references(ld_imm64(5, src=2) + ld_imm64(0, src=0) + EXIT) == {0: 5}


def test_patched_instructions_carry_this_processes_fds():
    e = make_entry()
    out = pc._patched(e.programs[0], {"flows": 40, "tx_ports": 41})
    assert pc.map_references(out) == {0: 40, 2: 41, 4: 40}
    assert out[6 * 8:] == e.programs[0].insns[6 * 8:]


# ---- the dir ----------------------------------------------------------------------------------


def write(d: Path, e: pc.Entry, **kw) -> Path:
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return pc.write_entry(d, e, **kw)


def test_write_then_read(cache):
    e = make_entry()
    path = write(cache, e)
    assert path.name == e.key + ".zfc" and (path.stat().st_mode & 0o777) == 0o600
    assert pc.read_entry(cache, e.key) == e
    assert [p.name for p in cache.iterdir()] == [path.name]       # no temporary file left


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "foreign", "empty", "garbage"])
def test_a_damaged_entry_on_disk_is_a_miss(cache, damage):
    e, other = make_entry(), make_entry(cflags=["-DX=1"])
    path = write(cache, e)
    data = path.read_bytes()
    path.write_bytes({"corrupt": data[:-9] + bytes([data[-9] ^ 1]) + data[-8:],
                      "truncated": data[:len(data) // 2],
                      "foreign": pc.encode(other),
                      "empty": b"",
                      "garbage": os.urandom(len(data))}[damage])
    assert pc.read_entry(cache, e.key) is None


def test_a_changed_kernel_or_source_finds_no_entry(cache):
    e = make_entry()
    write(cache, e)
    for other in (make_entry(release="6.19.0"), make_entry(source=SOURCE + "/* */\n"),
                  make_entry(cflags=CFLAGS + ["-DZF_FLOW_TABLE=131072"])):
        assert other.key != e.key
        assert pc.read_entry(cache, other.key) is None
    assert pc.read_entry(cache, e.key) == e


def test_the_dir_is_bounded_least_recently_used_first(cache):
    entries = [make_entry(cflags=[f"-DN={i}"]) for i in range(5)]
    size = len(pc.encode(entries[0]))
    for i, e in enumerate(entries):
        path = write(cache, e, max_bytes=10 * size)
        os.utime(path, (1000 + i, 1000 + i))
    os.utime(pc.entry_path(cache, entries[0].key), (2000, 2000))   # used again lately
    extra = make_entry(cflags=["-DN=99"])
    write(cache, extra, max_bytes=int(3.5 * size))
    left = {p.name[:-4] for p in cache.glob("*.zfc")}
    assert left == {extra.key, entries[0].key, entries[4].key}


def test_the_newest_entry_stays_even_if_alone_it_is_too_big(cache):
    e = make_entry()
    write(cache, e, max_bytes=10)
    assert pc.read_entry(cache, e.key) == e


def test_a_dir_others_can_write_is_not_used(tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    assert pc.usable_dir(d) is None
    os.chmod(d, 0o700)
    assert pc.usable_dir(d) == d


def test_stale_temporary_files_go(cache):
    e = make_entry()
    cache.mkdir(mode=0o700)
    stale, fresh = cache / ".tmp-dead.zfc", cache / ".tmp-writing.zfc"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(stale, (1, 1))
    write(cache, e)
    assert not stale.exists() and fresh.exists()


# ---- load(): miss, hit, a refused hit ----------------------------------------------------------


class FakeFunction:
    def __init__(self, name, fd):
        self.name, self.fd = name, fd


class FakeBPF:
    compiles = 0

    def __init__(self, text, cflags):
        FakeBPF.compiles += 1
        self.text, self.cflags = text, cflags

    def load_func(self, name, ptype):
        return FakeFunction(name, 100 + ptype)


class FakeBcc:
    BPF = FakeBPF


@pytest.fixture
def fake_kernel(monkeypatch):
    """load() with BCC's compile, the extraction from it and the kernel load faked."""
    FakeBPF.compiles = 0
    loaded = []

    def extract(bpf, programs, material, pin=None, inner=None):
        e = make_entry()
        e.material, e.key = material, pc.cache_key(material)
        e.programs = [pc.Program(n, t, p.insns, p.refs) for (n, t), p in zip(programs, e.programs)]
        return e

    def instantiate(entry, pin=None, load=None, map_sizes=None):
        if getattr(instantiate, "refuse", False):
            raise pc.HitError("the kernel refused the cached xdp_zfast: Invalid argument")
        entry = pc.sized(entry, map_sizes)
        bpf = pc.CachedBPF(entry, {})
        for p in entry.programs:
            if load is None or p.name in load:
                bpf.funcs[p.name.encode()] = pc.Function(bpf, p.name.encode(), 200)
        loaded.append(entry.key)
        instantiate.entries.append(entry)
        return bpf

    monkeypatch.setattr(pc, "extract", extract)
    monkeypatch.setattr(pc, "instantiate", instantiate)
    monkeypatch.setattr(pc, "bcc_version", lambda: "0.26.0")
    instantiate.loaded = loaded
    instantiate.entries = []
    return instantiate


def test_a_miss_compiles_and_writes_then_a_hit_does_not_compile(cache, fake_kernel):
    first = pc.load(SOURCE, CFLAGS, PROGRAMS, bcc=lambda: FakeBcc)
    assert (first.status, FakeBPF.compiles, set(first.funcs)) == ("miss", 1, {"xdp_zfast", "tc_zfast"})
    assert pc.read_entry(cache, first.key) is not None
    second = pc.load(SOURCE, CFLAGS, PROGRAMS, bcc=lambda: FakeBcc)
    assert (second.status, FakeBPF.compiles, second.key) == ("hit", 1, first.key)
    assert second.funcs["tc_zfast"].fd == 200 and fake_kernel.loaded == [first.key]


def test_a_corrupt_entry_compiles_again_and_is_replaced(cache, fake_kernel):
    first = pc.load(SOURCE, CFLAGS, PROGRAMS, bcc=lambda: FakeBcc)
    path = pc.entry_path(cache, first.key)
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    again = pc.load(SOURCE, CFLAGS, PROGRAMS, bcc=lambda: FakeBcc)
    assert again.status == "miss" and FakeBPF.compiles == 2
    assert pc.load(SOURCE, CFLAGS, PROGRAMS, bcc=lambda: FakeBcc).status == "hit"


def test_a_hit_the_kernel_refuses_compiles(cache, fake_kernel):
    pc.load(SOURCE, CFLAGS, PROGRAMS, bcc=lambda: FakeBcc)
    fake_kernel.refuse = True
    got = pc.load(SOURCE, CFLAGS, PROGRAMS, bcc=lambda: FakeBcc)
    assert got.status == "miss" and FakeBPF.compiles == 2 and "refused" in got.note


def test_another_kernel_release_is_a_miss(cache, fake_kernel, monkeypatch):
    pc.load(SOURCE, CFLAGS, PROGRAMS, bcc=lambda: FakeBcc)
    real = os.uname()
    monkeypatch.setattr(pc.os, "uname", lambda: os.uname_result(
        (real.sysname, real.nodename, "7.0.0-other", real.version, real.machine)))
    assert pc.load(SOURCE, CFLAGS, PROGRAMS, bcc=lambda: FakeBcc).status == "miss"
    assert len(list(cache.glob("*.zfc"))) == 2


def test_an_unusable_dir_compiles_without_caching(tmp_path, fake_kernel):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    got = pc.load(SOURCE, CFLAGS, PROGRAMS, bcc=lambda: FakeBcc, directory=d)
    assert got.status == "off" and not list(d.iterdir())


# ---- BCC's type descriptions --------------------------------------------------------------------

FLOW_KEY = ('["flow_key", [["src",["zf_addr", [["w","unsigned int", [4]] ], "struct_packed"]], '
            '["dst",["zf_addr", [["w","unsigned int", [4]] ], "struct_packed"]], '
            '["sport","unsigned short"], ["dport","unsigned short"], ["proto","unsigned char"], '
            '["family","unsigned char"], ["pad","unsigned short"] ], "struct_packed"]')


def test_type_descriptions_decode_as_bcc_lays_them_out():
    key = decode_type(json.loads(FLOW_KEY))
    assert ctypes.sizeof(key) == 40 and key.sport.offset == 32 and key.family.offset == 37
    assert decode_type("unsigned int") is ctypes.c_uint
    odd = decode_type(["s", [["a", "unsigned char"], ["b", "unsigned long long"]], "struct_packed"])
    assert ctypes.sizeof(odd) == 9
    aligned = decode_type(["s", [["a", "unsigned char"], ["b", "unsigned long long"]], "struct"])
    assert ctypes.sizeof(aligned) == 16
    u = decode_type(["u", [["a", "unsigned int"], ["b", "unsigned char", [8]]], "union"])
    assert ctypes.sizeof(u) == 8 and issubclass(u, ctypes.Union)
    bits = decode_type(["b", [["lo", "unsigned int", 4], ["hi", "unsigned int", 28]], "struct"])
    assert ctypes.sizeof(bits) == 4
    anon = decode_type(["o", [["x", "int"], ["", [["y", "int"]], "union"]], "struct"])
    assert anon.y.offset == 4


# ---- the CLI ------------------------------------------------------------------------------------


def test_cache_list_and_clear(cache):
    e, bad = make_entry(), make_entry(cflags=["-DBAD=1"])
    write(cache, e)
    path = write(cache, bad)
    path.write_bytes(path.read_bytes()[:100])
    result = CliRunner().invoke(cli.main, ["cache", "list", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["dir"] == str(cache)
    by_key = {x["key"]: x for x in doc["entries"]}
    assert by_key[e.key]["valid"] and by_key[e.key]["programs"] == ["xdp_zfast", "tc_zfast"]
    assert by_key[e.key]["release"] == KERNEL["release"]
    assert not by_key[bad.key]["valid"] and "truncated" in by_key[bad.key]["reason"]
    text = CliRunner().invoke(cli.main, ["cache", "list"])
    assert text.exit_code == 0 and e.key[:16] in text.output and "invalid" in text.output
    cleared = CliRunner().invoke(cli.main, ["cache", "clear", "--json"])
    assert cleared.exit_code == 0 and json.loads(cleared.output) == {"dir": str(cache), "removed": 2}
    assert not list(cache.iterdir())
    assert "0 entries" in CliRunner().invoke(cli.main, ["cache", "list"]).output


@pytest.mark.parametrize("change", [
    lambda d: d["maps"][0].update(name=7),
    lambda d: d["maps"][0].update(max_entries="65536"),
    lambda d: d["maps"][0].update(key_desc="{not json"),
    lambda d: d["maps"][0].update(extra=1),
    lambda d: d["programs"][0].update(insns="not base64!"),
    lambda d: d["programs"][0]["refs"].append(["x", "flows"]),
    lambda d: d["programs"][0].update(insns=""),
    lambda d: d.update(license=None),
])
def test_a_consistent_but_malformed_body_is_refused(change):
    """What only a writer of its own could make (the checksum matches): refused all the same."""
    data = pc.encode(make_entry())
    doc = json.loads(data[pc.HEADER.size:])
    change(doc)
    body = json.dumps(doc).encode()
    forged = pc.HEADER.pack(pc.MAGIC, pc.FORMAT, hashlib.sha256(body).digest(), len(body)) + body
    with pytest.raises(pc.Invalid):
        pc.decode(forged)


def test_a_miss_waits_for_a_compile_in_progress_and_uses_its_entry(cache, fake_kernel):
    """Daemons started together on a cold cache: one compiles, the others wait for the
    dir's compile lock, then load what it wrote."""
    cache.mkdir(mode=0o700)
    lock = os.open(cache / pc.LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)          # the first daemon, compiling
    got = {}
    waiter = threading.Thread(target=lambda: got.update(
        r=pc.load(SOURCE, CFLAGS, PROGRAMS, bcc=lambda: FakeBcc)))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and FakeBPF.compiles == 0
    material = pc.key_material(SOURCE, CFLAGS, PROGRAMS)
    write(cache, pc.extract(None, PROGRAMS, material))     # what the first one writes
    os.close(lock)                            # ... before it lets go
    waiter.join(5)
    assert got["r"].status == "hit" and FakeBPF.compiles == 0


def test_a_compile_lock_held_too_long_is_not_waited_for(cache, fake_kernel):
    cache.mkdir(mode=0o700)
    lock = os.open(cache / pc.LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        got = pc.load(SOURCE, CFLAGS, PROGRAMS, bcc=lambda: FakeBcc, lock_wait_s=0.2)
    finally:
        os.close(lock)
    assert got.status == "miss" and FakeBPF.compiles == 1
    assert [p.name for p in cache.glob("*.zfc")] == [got.key + ".zfc"]
    assert pc.clear(cache) == 1 and (cache / pc.LOCK).exists()


# ---- sizes at run time, programs on demand -------------------------------------------------


def test_a_new_map_size_is_the_same_entry_with_maps_of_that_size(cache, fake_kernel):
    """A flow table the scaling controller grew: no compile, the maps made at the new size."""
    first = pc.load(SOURCE, [], PROGRAMS, bcc=lambda: FakeBcc, size_flags=["-DZF_FLOW_TABLE=65536"],
                    map_sizes={"flows": 65536})
    grown = pc.load(SOURCE, [], PROGRAMS, bcc=lambda: FakeBcc, size_flags=["-DZF_FLOW_TABLE=262144"],
                    map_sizes={"flows": 262144})
    assert (first.status, grown.status, grown.key, FakeBPF.compiles) == ("miss", "hit", first.key, 1)
    sizes = {m.name: m.max_entries for m in fake_kernel.entries[-1].maps}
    assert sizes == {"flows": 262144, "tx_ports": 4096}


def test_a_miss_compiles_the_size_flags_in(cache, fake_kernel, monkeypatch):
    seen = []
    monkeypatch.setattr(FakeBPF, "__init__", lambda self, text, cflags: seen.append(cflags))
    pc.load(SOURCE, ["-DZF_RING_SIZE=13"], PROGRAMS, bcc=lambda: FakeBcc,
            size_flags=["-DZF_FLOW_TABLE=1024"], map_sizes={"flows": 65536})
    assert seen == [["-DZF_RING_SIZE=13", "-DZF_FLOW_TABLE=1024"]]


def test_sizes_that_do_not_match_the_compiled_maps_are_not_cached(cache, fake_kernel):
    """make_entry's flows has 65536 entries: a caller's table that says 1024 is wrong about
    the source, and an entry from it would make maps of other sizes than asked."""
    got = pc.load(SOURCE, [], PROGRAMS, bcc=lambda: FakeBcc, size_flags=["-DZF_FLOW_TABLE=1024"],
                  map_sizes={"flows": 1024})
    assert got.status == "off" and "map flows: compiled with 65536 entries" in got.note
    assert pc.read_entry(cache, got.key) is None


def test_sized_changes_only_the_maps_named():
    e = make_entry()
    s = pc.sized(e, {"tx_ports": 64})
    assert [(m.name, m.max_entries) for m in s.maps] == [("flows", 65536), ("tx_ports", 64)]
    assert [(m.name, m.max_entries) for m in e.maps] == [("flows", 65536), ("tx_ports", 4096)]
    with pytest.raises(pc.HitError, match="no map rings"):
        pc.sized(e, {"rings": 10})


def test_only_the_programs_asked_for_load_now(cache, fake_kernel):
    pc.load(SOURCE, CFLAGS, PROGRAMS, bcc=lambda: FakeBcc)
    got = pc.load(SOURCE, CFLAGS, PROGRAMS, bcc=lambda: FakeBcc, load=["tc_zfast"])
    assert (got.status, set(got.funcs)) == ("hit", {"tc_zfast"})
    miss = pc.load(SOURCE + " ", CFLAGS, PROGRAMS, bcc=lambda: FakeBcc, load=["xdp_zfast"])
    assert (miss.status, set(miss.funcs)) == ("miss", {"xdp_zfast"})


def test_forget_removes_one_entry(cache, fake_kernel):
    a = pc.load(SOURCE, CFLAGS, PROGRAMS, bcc=lambda: FakeBcc)
    b = pc.load(SOURCE + " ", CFLAGS, PROGRAMS, bcc=lambda: FakeBcc)
    pc.forget(a.key)
    pc.forget(a.key)                    # gone already: nothing to do
    assert pc.read_entry(cache, a.key) is None and pc.read_entry(cache, b.key) is not None
    assert pc.load(SOURCE, CFLAGS, PROGRAMS, bcc=lambda: FakeBcc).status == "miss"


def test_has_entry_says_whether_a_start_would_compile(cache, fake_kernel):
    key = pc.cache_key(pc.key_material(SOURCE, CFLAGS, PROGRAMS))
    assert not pc.has_entry(key)
    assert pc.load(SOURCE, CFLAGS, PROGRAMS, bcc=lambda: FakeBcc).key == key
    assert pc.has_entry(key)
    pc.entry_path(cache, key).write_bytes(b"garbage")
    assert not pc.has_entry(key)


# ---- maps of maps ---------------------------------------------------------------------------


def test_a_map_of_maps_names_its_inner_map_from_the_source():
    source = '''ZF_MAP("array", u32, u32, ring_template, ZF_RING_SIZE);
ZF_MAP("array_of_maps$ring_template", u32, int, rings, ZF_MAX_RINGS);
BPF_TABLE("hash_of_maps$ring_template", struct k, int, by_key, 16);'''
    assert pc.inner_maps(source) == {"rings": "ring_template", "by_key": "ring_template"}


def _with_rings(inner: str | None) -> pc.Entry:
    e = make_entry()
    e.maps += [MapDef("ring_template", 2, 4, 4, 65537, 0, 0, '"unsigned int"', '"unsigned int"'),
               MapDef("rings", 12, 4, 4, 128, 0, 0, '"unsigned int"', '"int"', None, inner=inner)]
    return e


def test_a_map_of_maps_survives_encoding_with_its_inner_map():
    e = _with_rings("ring_template")
    assert pc.decode(pc.encode(e), e.key).maps[-1].inner == "ring_template"


@pytest.mark.parametrize("inner", [None, "no_such_map", "rings"])
def test_a_map_of_maps_without_a_plain_inner_map_of_the_entry_is_refused(inner):
    e = _with_rings(inner)
    with pytest.raises(pc.Invalid, match="rings"):
        pc.decode(pc.encode(e), e.key)


def test_a_plain_map_naming_an_inner_map_is_refused():
    e = make_entry()
    e.maps[0] = replace(e.maps[0], inner="tx_ports")
    with pytest.raises(pc.Invalid, match="flows"):
        pc.decode(pc.encode(e), e.key)
