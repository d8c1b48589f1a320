/* SPDX-License-Identifier: GPL-2.0 */
/*
 * minimal_fwd.c: the least an XDP L4 forwarder can do, as the benchmark's
 * upper bound (tools/bench.py).  IPv4 to one VIP: rewrite the destination
 * address to one backend, fix the IPv4 and UDP/TCP checksums incrementally,
 * set the MACs and bpf_redirect() to one egress port, all from one config
 * map.  No flow table, no FIB lookup, no counters, no TTL.
 */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>

struct fwd_cfg {
	__be32 vip;
	__be32 backend;
	__u32 ifindex;     /* egress port */
	__u8 dmac[ETH_ALEN];
	__u8 smac[ETH_ALEN];
};

BPF_ARRAY(fwd_cfg, struct fwd_cfg, 1);

static __always_inline __u32 mf_csum_add(__u32 a, __u32 b)
{
	a += b;
	return a + (a < b);
}

static __always_inline __u16 mf_csum_apply(__u16 check, __u32 diff)
{
	__u32 s = mf_csum_add((__u16)~check, diff);

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return ~(__u16)s;
}

int xdp_minimal_fwd(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph = data + sizeof(*eth);
	struct fwd_cfg *cfg;
	__u32 zero = 0, diff;

	if ((void *)(iph + 1) > data_end)
		return XDP_PASS;
	if (eth->h_proto != bpf_htons(ETH_P_IP) || iph->ihl != 5)
		return XDP_PASS;
	cfg = fwd_cfg.lookup(&zero);
	if (!cfg || iph->daddr != cfg->vip)
		return XDP_PASS;

	diff = mf_csum_add(~iph->daddr, cfg->backend);
	iph->daddr = cfg->backend;
	iph->check = mf_csum_apply(iph->check, diff);
	if (iph->protocol == IPPROTO_UDP) {
		struct udphdr *uh = (void *)(iph + 1);

		if ((void *)(uh + 1) > data_end)
			return XDP_PASS;
		if (uh->check) {
			__u16 c = mf_csum_apply(uh->check, diff);

			uh->check = c ? c : 0xffff;
		}
	} else if (iph->protocol == IPPROTO_TCP) {
		struct tcphdr *th = (void *)(iph + 1);

		if ((void *)(th + 1) > data_end)
			return XDP_PASS;
		th->check = mf_csum_apply(th->check, diff);
	}
	__builtin_memcpy(eth->h_dest, cfg->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, cfg->smac, ETH_ALEN);
	return bpf_redirect(cfg->ifindex, 0);
}
