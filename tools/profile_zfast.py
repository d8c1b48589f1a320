#!/usr/bin/env python3
"""Where zfast's time per packet goes: variants of its program, each without one part.

bpf/ is never touched: the data plane's source is inlined (as the loader does),
one part is cut out by a text patch, and the result is compiled from a
temporary directory.  Every variant runs through the bench harness (tools/
bench.py: fresh headers every run, then a tail call) in the bench topology, on
the same frames as the trivial XDP_PASS baseline:
  hot   one known flow, again and again
  1k    1000 known flows in turn (what the throughput run sends)
  new   a new flow every run
What a part costs = full program - the variant without it.  A patch that no
longer matches the source (the data plane changed) is reported, not applied.

    tools/profile_zfast.py [--quick] [--throughput]
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools import bench as B  # noqa: E402

# name -> (what is cut, [(regex, replacement)])
PATCHES: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "no_stats": ("service/backend/port/reason counters (per-CPU array lookups)", [
        (r"(static __always_inline void zf_count_service\([^)]*\)\s*\{)", r"\1\n\treturn;"),
        (r"zf_count\(reason_stats\.lookup\(&key\), len\);", ""),
        (r"(static __always_inline void zf_count_port\([^)]*\)\s*\{)", r"\1\n\treturn;"),
    ]),
    "no_fib": ("bpf_fib_lookup (replaced by the known answer: l1, the sink's MAC)", [
        (r"rc = bpf_fib_lookup\(ctx, &fib, sizeof\(fib\), 0\);", "rc = zf_fake_fib(&fib);"),
        (r"(static __always_inline int zf_forward\()", "@FAKE_FIB@\n\\1"),
    ]),
    "no_backend_check": ("backends lookup of a known flow (is its backend down?)", [
        (r"return be && \(be->flags & ZF_BACKEND_DOWN\);", "return 0;"),
    ]),
    "no_config": ("config lookup (firewall generation) of every packet", [
        (r"cfg = config\.lookup\(&zero\);", "cfg = 0;"),
    ]),
    "direct_redirect": ("devmap redirect_map (bpf_redirect instead)", [
        (r"if \(tx_ports\.redirect_map\(fib\.ifindex, XDP_PASS\) != XDP_REDIRECT\)\s*"
         r"bpf_redirect\(fib\.ifindex, 0\);", "bpf_redirect(fib.ifindex, 0);"),
    ]),
    "no_flow_hash": ("flows hash lookup (a one-entry array holds the bench flow instead)", [
        (r"fv = flows\.lookup\(&p->key\);", "fv = zf_one_flow_get();"),
        (r"(static __always_inline int zf_balance\()",
         "BPF_ARRAY(zf_one_flow, struct flow_value, 1);\n"
         "static __always_inline struct flow_value *zf_one_flow_get(void)\n"
         "{\n\t__u32 z = 0;\n\n\treturn zf_one_flow.lookup(&z);\n}\n\n\\1"),
    ]),
    # not cuts but alternatives, to see what they would buy
    "fib_direct": ("alternative: bpf_fib_lookup with BPF_FIB_LOOKUP_DIRECT (no FIB rules)", [
        (r"rc = bpf_fib_lookup\(ctx, &fib, sizeof\(fib\), 0\);",
         "rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), BPF_FIB_LOOKUP_DIRECT);"),
    ]),
    "one_insert": ("new flow: the reply entry is not inserted (one map update, not two)", [
        (r"if \(flows\.update\(&rkey, &rval\) \|\| flows\.update\(&p->key, fwd\)\)",
         "if (flows.update(&p->key, fwd))"),
    ]),
    "lru_percpu": ("alternative: flows as a per-CPU-list LRU (BPF_F_NO_COMMON_LRU)", [
        (r'ZF_MAP\("lru_hash", struct flow_key, struct flow_value, flows, ZF_FLOW_TABLE\);',
         'ZF_MAP_F("lru_hash", struct flow_key, struct flow_value, flows, ZF_FLOW_TABLE, '
         'BPF_F_NO_COMMON_LRU);'),
    ]),
    "plain_hash": ("alternative: flows as a plain (preallocated, non-LRU) hash", [
        (r'ZF_MAP\("lru_hash", struct flow_key, struct flow_value, flows, ZF_FLOW_TABLE\);',
         'ZF_MAP("hash", struct flow_key, struct flow_value, flows, ZF_FLOW_TABLE);'),
    ]),
}
CUT_ALL = ["no_stats", "no_fib", "no_backend_check", "no_config", "direct_redirect"]


def fake_fib(ifindex: int, dmac: bytes, smac: bytes) -> str:
    lines = ["static __always_inline int zf_fake_fib(struct bpf_fib_lookup *f)", "{",
             f"\tf->ifindex = {ifindex};"]
    lines += [f"\tf->dmac[{i}] = {b:#04x};" for i, b in enumerate(dmac)]
    lines += [f"\tf->smac[{i}] = {b:#04x};" for i, b in enumerate(smac)]
    lines += ["\treturn 0;", "}", ""]
    return "\n".join(lines)


def variant_source(base: str, names: list[str], fake: str) -> tuple[str | None, str]:
    """(patched source or None, problem)."""
    text = base
    for name in names:
        for pattern, repl in PATCHES[name][1]:
            new, count = re.subn(pattern, repl.replace("@FAKE_FIB@", fake), text, count=1)
            if count != 1:
                return None, f"{name}: pattern {pattern[:40]!r}... not in the source"
            text = new
    return text, ""


def main(argv: list[str] | None = None) -> int:
    ap = B.build_parser()
    ap.description = "Cost of each part of zfast's per-packet path (program variants)."
    ap.add_argument("--throughput", action="store_true",
                    help="also delivered Mpps: nftables, minimal, full zfast and the variants "
                         "of --tput-variants, in turns")
    ap.add_argument("--tput-variants", default="no_fib,all_cut",
                    help="variants in the throughput turns (default no_fib,all_cut)")
    ap.add_argument("--only", help="profile only these variants (comma list; full is "
                                   "always included)")
    args = B.parse_args(argv, ap)
    from zfast.dataplane.loader import inline_source, set_addr
    from zfast.lab.netns import in_ns
    from zfast.paths import bpf_dir

    bench = B.Bench(args)
    tmp = Path(tempfile.mkdtemp(prefix="zfprof-"))
    rows, notes = [], []
    pin = B.pinned(args.measure_cpu)
    pin.__enter__()
    try:
        bench.build()
        base_src = inline_source(bpf_dir() / "zfast.c")
        fake = fake_fib(bench.l1, bench.s0_mac, bench.l1_mac)
        tb, tfn = bench.trivial = B.load_xdp(text=B.TRIVIAL_C, fn="xdp_pass")
        bench.trivial_fd = tfn.fd
        bench.harness = B.Harness(bench.spec())
        bench.new_base = 0
        mb, mfn = bench.minimal = bench.load_minimal()
        variants = [("full", [])] + [(n, [n]) for n in PATCHES] + \
            [("all_cut", CUT_ALL), ("all_cut+no_flow_hash", CUT_ALL + ["no_flow_hash"])]
        repeat, rnew = bench.repeat, bench.repeat_new
        rounds = args.rounds or (2 if args.quick else 5)
        loaded, specs = {}, {}
        if args.only:
            keep = {"full", *args.only.split(",")}
            variants = [v for v in variants if v[0] in keep]
        for k, (name, cuts) in enumerate(variants):
            src, problem = variant_source(base_src, cuts, fake)
            if src is None:
                notes.append(f"{name} skipped: {problem}")
                continue
            d = tmp / name
            d.mkdir()
            (d / "zfast.c").write_text(src)
            shutil.copy(bpf_dir() / "zfast_shared.h", d / "zfast_shared.h")
            # room for the 1000 flows and every round's new flows (2 entries each)
            dp, svc = bench.load_zfast(1000 + 4 * rnew * rounds + 8192, src_dir=d)
            if "no_flow_hash" in cuts:   # the one flow the hot run sends, forward to the sink
                t = dp.table("zf_one_flow")
                v = t.Leaf()
                set_addr(v.addr, ipaddress.ip_address(B.SINK_IP))
                v.port = int.from_bytes(B.PORT.to_bytes(2, "big"), "little")
                v.dir = 1
                t[t.Key(0)] = v
            loaded[name] = (dp, cuts)
            specs[name] = (bench.harness_spec(0x0A3F0000 + k, 9, 1),
                           bench.harness_spec(0x0A400000 + (k << 8), 1024, 1000, ports=1000))
        res = {name: {"hot": [], "k1": [], "new": []} for name in loaded}
        res["minimal_fwd.c"] = {"hot": [], "k1": [], "new": []}
        one = bench.harness_spec(0x0A3C0001, 9, 1)
        with in_ns(bench.lb_ns):
            for r in range(rounds):
                names = list(loaded) if r % 2 == 0 else list(reversed(loaded))
                m, m_b = bench.measure(mfn.fd, one, repeat, tries=1)
                res["minimal_fwd.c"]["hot"].append(m - m_b)
                for name in names:
                    dp, cuts = loaded[name]
                    hot_s, k1_s = specs[name]
                    hot, hot_b = bench.measure(dp.prog_fd, hot_s, repeat, dp=dp, want="fwd_flow",
                                               warm=1 if r == 0 else 0, tries=1)
                    res[name]["hot"].append(hot - hot_b)
                    if "no_flow_hash" in cuts:
                        continue
                    k1, k1_b = bench.measure(dp.prog_fd, k1_s, repeat, dp=dp, want="fwd_flow",
                                             warm=1000 if r == 0 else 0, tries=1)
                    res[name]["k1"].append(k1 - k1_b)
                    new, new_b = bench.measure(dp.prog_fd, bench.new_spec(2 * rnew), rnew,
                                               dp=dp, want="fwd_new", tries=1)
                    res[name]["new"].append(new - new_b)
                B.log(f"profile round {r + 1}/{rounds} done")
        med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
        rows.append({"variant": "minimal_fwd.c", "cut": "(reference)",
                     "hot": med(res["minimal_fwd.c"]["hot"]), "k1": None, "new": None,
                     "size": B.prog_size(mfn.fd)})
        for name, (dp, cuts) in loaded.items():
            cut = PATCHES[cuts[0]][0] if len(cuts) == 1 else " + ".join(cuts) or "-"
            rows.append({"variant": name, "cut": cut,
                         "hot": med(res[name]["hot"]), "k1": med(res[name]["k1"]),
                         "new": med(res[name]["new"]), "size": B.prog_size(dp.prog_fd),
                         "samples": res[name]})
        tput = None
        if args.throughput:
            secs = args.seconds or (1.2 if args.quick else 2.5)
            methods = {"nftables": bench.nft_method(), "minimal": bench.xdp_method(mfn),
                       "zfast": bench.xdp_method(loaded["full"][0])}
            for v in args.tput_variants.split(","):
                if v in loaded:
                    methods[f"zfast {v}"] = bench.xdp_method(loaded[v][0])
            tput = bench.run_rounds(methods, rounds, 0.5, secs)
    finally:
        pin.__exit__(None, None, None)
        bench.close()
        shutil.rmtree(tmp, ignore_errors=True)

    full = next((r for r in rows if r["variant"] == "full"), None)
    f = lambda x: "-" if x is None else f"{x:.0f}"  # noqa: E731
    print("### Where zfast's time goes (net ns/packet; harness + trivial subtracted)\n")
    print(f"data plane: {B.source_id()}\n")
    print(f"repeat={bench.repeat} (new flows: {bench.repeat_new}); each round measures every "
          f"variant once (order alternating), medians of {rounds} rounds. "
          f"'saved' = full - variant.\n")
    print("| variant | cut out | hot flow | saved | 1000 flows | saved | new flow | saved | size |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        sv = lambda key: "-" if full is None or r[key] is None or full[key] is None \
            or r is full or r["variant"] == "minimal_fwd.c" else f"{full[key] - r[key]:.0f}"  # noqa: E731
        print(f"| {r['variant']} | {r['cut']} | {f(r['hot'])} | {sv('hot')} | {f(r['k1'])} | "
              f"{sv('k1')} | {f(r['new'])} | {sv('new')} | {r['size']} |")
    for n in notes:
        print(f"\nNote: {n}")
    if tput:
        nft, mini = tput["nftables"].median, tput["minimal"].median
        print(f"\nDelivered at the sink (bench topology, {rounds} rounds, medians):\n")
        print("| program on l0 | delivered Mpps | vs nftables | vs minimal | rounds |")
        print("|---|---:|---:|---:|---|")
        for m, tp in tput.items():
            print(f"| {m} | {tp.median:.2f} | {tp.median / nft:.2f}x | {tp.median / mini:.2f}x | "
                  f"{', '.join(f'{x:.2f}' for x in tp.delivered)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
