/* SPDX-License-Identifier: GPL-2.0 */
/*
 * trafficgen.c: an XDP traffic generator run through BPF_PROG_RUN with
 * BPF_F_TEST_XDP_LIVE_FRAMES (tools/trafficgen.py drives it).
 *
 * The kernel recycles live frames, and a forwarder may have rewritten a
 * recycled frame in place, so every run writes ALL headers again from the
 * template in gen_cfg, then makes the frame flow number i (a per-CPU counter
 * modulo cfg->flows): source port  sport_base + i % ports,  last 32 bits of
 * the source address  saddr_base + i / ports.  Checksums are updated
 * incrementally from the template's (which Python computed for flow 0).
 *
 * With -DTAIL_CALL the program is a benchmark harness instead (tools/bench.py):
 * it writes the frame the same way, then tail-calls the program under test
 * (harness_target[0]).  BPF_PROG_RUN's repeat runs a program again and again
 * on the frame the previous run left, which a NAT program has rewritten; the
 * harness gives every run the frame it is meant to see.  cfg->mult spreads
 * consecutive runs over the flows (flow = counter * mult % flows).
 *
 * Compile-time constants (-D, from trafficgen.py):
 *   HDR_LEN      bytes of headers in the template (eth + ip + l4)
 *   SPORT_OFF    offset of the L4 source port
 *   SADDR_OFF    offset of the last 32-bit word of the source address
 *   IPCSUM_OFF   offset of the IPv4 header checksum, or -1 (IPv6)
 *   L4CSUM_OFF   offset of the UDP/TCP checksum
 *   IS_UDP       1 for UDP (a computed zero checksum is sent as 0xffff)
 */
#include <uapi/linux/bpf.h>

#define HDR_MAX 96

struct gen_cfg {
	__u32 ifindex;    /* redirect target: the sending veth */
	__u32 flows;      /* >= 1 */
	__u32 ports;      /* source ports per source address, >= 1 */
	__u32 sport_base; /* host order */
	__u32 saddr_base; /* host order: last 32 bits of the source address */
	__u32 mult;       /* flow i = counter * mult % flows; 1: in order */
	__u8 hdr[HDR_MAX];
};

BPF_ARRAY(gen_cfg, struct gen_cfg, 1);
BPF_PERCPU_ARRAY(gen_count, __u64, 1);
#ifdef TAIL_CALL
BPF_PROG_ARRAY(harness_target, 1);
#endif

static __always_inline __u32 csum_add(__u32 a, __u32 b)
{
	a += b;
	return a + (a < b);
}

static __always_inline __u16 csum_fold(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

/* HC' = ~(~HC + diff), RFC 1624 */
static __always_inline __u16 csum_apply(__u16 check, __u32 diff)
{
	return ~csum_fold(csum_add((__u16)~check, diff));
}

int xdp_gen(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct gen_cfg *cfg;
	__u64 *cnt;
	__u32 zero = 0, i, pi, ai, diff_addr = 0, diff_l4 = 0;

	cfg = gen_cfg.lookup(&zero);
	cnt = gen_count.lookup(&zero);
	if (!cfg || !cnt)
		return XDP_ABORTED;
	if (data + HDR_LEN > data_end)
		return XDP_ABORTED;
	__builtin_memcpy(data, cfg->hdr, HDR_LEN);

	i = (*cnt * cfg->mult) % cfg->flows;
	*cnt += 1;
	pi = i % cfg->ports;
	ai = i / cfg->ports;

	if (pi) {
		__be16 *sp = data + SPORT_OFF;
		__be16 old = *sp, new = bpf_htons((__u16)(cfg->sport_base + pi));

		*sp = new;
		diff_l4 = csum_add(csum_add(diff_l4, (__u16)~old), new);
	}
	if (ai) {
		__be32 *sa = data + SADDR_OFF;
		__be32 old = *sa, new = bpf_htonl(cfg->saddr_base + ai);

		*sa = new;
		diff_addr = csum_add(csum_add(0, ~old), new);
		diff_l4 = csum_add(diff_l4, diff_addr);
#if IPCSUM_OFF >= 0
		{
			__u16 *ic = data + IPCSUM_OFF;

			*ic = csum_apply(*ic, diff_addr);
		}
#endif
	}
	if (diff_l4) {
		__u16 *lc = data + L4CSUM_OFF;
		__u16 c = csum_apply(*lc, diff_l4);

#if IS_UDP
		if (!c)
			c = 0xffff;
#endif
		*lc = c;
	}
#ifdef TAIL_CALL
	harness_target.call(ctx, 0);
	return XDP_ABORTED; /* no program under test */
#else
	return bpf_redirect(cfg->ifindex, 0);
#endif
}
