/* SPDX-License-Identifier: GPL-2.0 */
/*
 * nat.h: rewrite a packet's source or destination (address and port) and
 * keep every checksum valid: the IPv4 header, and TCP/UDP through their
 * pseudo header.  An IPv4 UDP datagram without a checksum (zero) keeps zero.
 */
#ifndef ZFAST_NAT_H
#define ZFAST_NAT_H

#include "csum.h"
#include "parse.h"

#define ZF_SIDE_SRC 0
#define ZF_SIDE_DST 1

/*
 * Rewrite the outer source or destination address.  Fixes the IPv4 header
 * checksum; adds the change to *diff for checksums with a pseudo header.
 */
static __always_inline int zf_set_l3_addr(struct zf_pkt *p, int side, const struct zf_addr *addr,
					  __u32 *diff)
{
	if (p->family == ZF_AF_INET) {
		struct iphdr *iph = zf_l3(p, struct iphdr);
		__u32 d;

		if (!iph)
			return ZF_DROP_MALFORMED;
		if (side == ZF_SIDE_DST) {
			d = zf_csum_diff32(0, iph->daddr, addr->w[0]);
			iph->daddr = addr->w[0];
		} else {
			d = zf_csum_diff32(0, iph->saddr, addr->w[0]);
			iph->saddr = addr->w[0];
		}
		iph->check = zf_csum_apply(iph->check, d);
		*diff = zf_csum_add(*diff, d);
	} else {
		struct ipv6hdr *ip6h = zf_l3(p, struct ipv6hdr);
		__be32 *a;
		int i;

		if (!ip6h)
			return ZF_DROP_MALFORMED;
		a = side == ZF_SIDE_DST ? ip6h->daddr.s6_addr32 : ip6h->saddr.s6_addr32;
#pragma unroll
		for (i = 0; i < 4; i++) {
			*diff = zf_csum_diff32(*diff, a[i], addr->w[i]);
			a[i] = addr->w[i];
		}
	}
	return ZF_CONTINUE;
}

/* Rewrite the TCP/UDP port of one side, folding diff (the address change) in. */
static __always_inline int zf_set_l4_port(struct zf_pkt *p, int side, __be16 port, __u32 diff)
{
	if (p->frag == ZF_FRAG_LATER)
		return ZF_CONTINUE; /* no L4 header: the first fragment carried the change */
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *th = zf_l4(p, struct tcphdr);
		__be16 *pp;

		if (!th)
			return ZF_DROP_MALFORMED;
		pp = side == ZF_SIDE_DST ? &th->dest : &th->source;
		diff = zf_csum_diff16(diff, *pp, port);
		*pp = port;
		th->check = zf_csum_apply(th->check, diff);
	} else if (p->proto == IPPROTO_UDP) {
		struct udphdr *uh = zf_l4(p, struct udphdr);
		__be16 *pp;
		__u16 check;

		if (!uh)
			return ZF_DROP_MALFORMED;
		if (!uh->check && p->family == ZF_AF_INET6)
			return ZF_DROP_UDP6_NO_CSUM; /* zf_balance refuses these earlier */
		pp = side == ZF_SIDE_DST ? &uh->dest : &uh->source;
		diff = zf_csum_diff16(diff, *pp, port);
		*pp = port;
		if (uh->check) {
			check = zf_csum_apply(uh->check, diff);
			/* A computed zero is sent as all ones (RFC 768). */
			uh->check = check ? check : 0xffff;
		}
	}
	return ZF_CONTINUE;
}

/* IPv6 UDP must carry a checksum: one without cannot be patched, nor accepted. */
static __always_inline int zf_udp6_no_csum(struct zf_pkt *p)
{
	struct udphdr *uh;

	if (p->family != ZF_AF_INET6 || p->proto != IPPROTO_UDP || p->frag == ZF_FRAG_LATER)
		return 0;
	uh = zf_l4(p, struct udphdr);
	return uh && !uh->check;
}

/* Rewrite address and port of one side of a TCP/UDP packet. */
static __always_inline int zf_nat(struct zf_pkt *p, int side, const struct zf_addr *addr, __be16 port)
{
	__u32 diff = 0;
	int ret;

	ret = zf_set_l3_addr(p, side, addr, &diff);
	if (ret != ZF_CONTINUE)
		return ret;
	return zf_set_l4_port(p, side, port, diff);
}

#endif /* ZFAST_NAT_H */
