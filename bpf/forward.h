/* SPDX-License-Identifier: GPL-2.0 */
/*
 * forward.h: L3 forwarding of a rewritten packet.  The kernel's FIB picks the
 * egress port and next hop; the packet leaves through the devmap.  Where the
 * FIB cannot answer (no neighbour yet, a local or unreachable route) the
 * packet goes to the kernel, which resolves or answers it.  The XDP program
 * leaves through the devmap; the tc program redirects the skb.
 */
#ifndef ZFAST_FORWARD_H
#define ZFAST_FORWARD_H

#include "hook.h"
#include "maps.h"
#include "parse.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

/* A packet whose TTL would expire here is the kernel's: it sends the ICMP. */
static __always_inline int zf_ttl_expires(struct zf_pkt *p)
{
	if (p->family == ZF_AF_INET) {
		struct iphdr *iph = zf_l3(p, struct iphdr);

		return !iph || iph->ttl <= 1;
	} else {
		struct ipv6hdr *ip6h = zf_l3(p, struct ipv6hdr);

		return !ip6h || ip6h->hop_limit <= 1;
	}
}

/*
 * Send a rewritten packet on.  cache, when given, is the flow's map entry: its
 * cached next hop is used while valid (cfg->nh_gen), else refreshed from the FIB.
 */
static __always_inline int zf_forward(void *ctx, struct zf_pkt *p, int reason,
				      struct flow_value *cache, struct zf_config *cfg, const int hook)
{
	struct bpf_fib_lookup fib = {};
	struct ethhdr *eth;
	__u32 ifindex, *tx;
	int rc;

	/* XDP cannot transmit through a VLAN device: the kernel forwards it. */
	if (p->vlan)
		return ZF_PASS_VLAN;

	if (cache && cfg && cache->nh_ifindex && cache->nh_gen == (__u16)cfg->nh_gen) {
		ifindex = cache->nh_ifindex;
		__builtin_memcpy(fib.dmac, cache->nh_dmac, ETH_ALEN);
		__builtin_memcpy(fib.smac, cache->nh_smac, ETH_ALEN);
		goto out;
	}

	fib.ifindex = zf_ctx_ifindex(ctx, hook);
	fib.l4_protocol = p->proto;
	if (p->family == ZF_AF_INET) {
		struct iphdr *iph = zf_l3(p, struct iphdr);

		if (!iph)
			return ZF_DROP_MALFORMED;
		fib.family = AF_INET;
		fib.tos = iph->tos;
		fib.tot_len = hook == ZF_HOOK_TC ? 0 : bpf_ntohs(iph->tot_len);
		fib.ipv4_src = iph->saddr;
		fib.ipv4_dst = iph->daddr;
	} else {
		struct ipv6hdr *ip6h = zf_l3(p, struct ipv6hdr);

		if (!ip6h)
			return ZF_DROP_MALFORMED;
		fib.family = AF_INET6;
		fib.flowinfo = *(__be32 *)ip6h & bpf_htonl(0x0fffffff);
		fib.tot_len = hook == ZF_HOOK_TC ? 0 : bpf_ntohs(ip6h->payload_len) + sizeof(*ip6h);
		__builtin_memcpy(fib.ipv6_src, &ip6h->saddr, 16);
		__builtin_memcpy(fib.ipv6_dst, &ip6h->daddr, 16);
	}

	/* tc gives no length: the kernel then checks the skb itself against the
	 * egress MTU, a GSO packet by its segments. */
	rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return ZF_PASS_NO_NEIGH;
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return ZF_PASS_FIB;
	ifindex = fib.ifindex;
	if (cache && cfg) {
		cache->nh_ifindex = ifindex;
		__builtin_memcpy(cache->nh_dmac, fib.dmac, ETH_ALEN);
		__builtin_memcpy(cache->nh_smac, fib.smac, ETH_ALEN);
		cache->nh_gen = cfg->nh_gen;
	}
out:
	if (hook == ZF_HOOK_XDP) {
		/* An egress XDP frames cannot reach: the kernel forwards (untouched TTL). */
		tx = tx_flags.lookup(&ifindex);
		if (tx && (*tx & ZF_TX_KERNEL))
			return ZF_PASS_EGRESS;
	}

	if (p->family == ZF_AF_INET) {
		struct iphdr *iph = zf_l3(p, struct iphdr);

		if (!iph)
			return ZF_DROP_MALFORMED;
		/* TTL sits in the high byte of its 16-bit checksum word. */
		iph->ttl--;
		iph->check = zf_csum_apply(iph->check, zf_csum_diff16(0, bpf_htons(0x0100), 0));
	} else {
		struct ipv6hdr *ip6h = zf_l3(p, struct ipv6hdr);

		if (!ip6h)
			return ZF_DROP_MALFORMED;
		ip6h->hop_limit--;
	}
	eth = zf_at(p, 0, sizeof(*eth));
	if (!eth)
		return ZF_DROP_MALFORMED;
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);

	/* The devmap batches; a port missing from it still goes out directly. */
	if (hook == ZF_HOOK_TC || tx_ports.redirect_map(ifindex, XDP_PASS) != XDP_REDIRECT)
		bpf_redirect(ifindex, 0);
	return reason;
}

#endif /* ZFAST_FORWARD_H */
