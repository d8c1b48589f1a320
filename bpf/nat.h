/* SPDX-License-Identifier: GPL-2.0 */
/*
 * nat.h: rewrite a packet's source or destination (address and port) and
 * keep every checksum valid: the IPv4 header, and TCP/UDP through their
 * pseudo header.  An IPv4 UDP datagram without a checksum (zero) keeps zero.
 *
 * On XDP the TCP/UDP checksum is a full one (a NIC hands over nothing else)
 * and is patched in place.  On tc it may be partial (the sender's TX checksum
 * offload: the field holds the pseudo header's sum, the skb says so, and a
 * device or the receiver completes it); the kernel's bpf_l4_csum_replace
 * knows which, and patches the pseudo header part only, or the whole.
 */
#ifndef ZFAST_NAT_H
#define ZFAST_NAT_H

#include "csum.h"
#include "hook.h"
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

/*
 * tc: the checksum at offset off through the kernel, which knows whether the
 * skb's checksum is partial: the address change (diff) as a pseudo header
 * change, then the port change.  flags: BPF_F_MARK_MANGLED_0 for UDP.
 */
static __always_inline int zf_tc_l4_csum(void *ctx, struct zf_pkt *p, __u32 off, __u32 diff,
					 __be16 old_port, __be16 port, __u64 flags)
{
	off &= ZF_OFF_MASK;
	if (bpf_l4_csum_replace(ctx, off, 0, diff, flags | BPF_F_PSEUDO_HDR) ||
	    bpf_l4_csum_replace(ctx, off, old_port, port, flags | sizeof(port)))
		return ZF_DROP_ERROR;
	zf_reload(ctx, p, ZF_HOOK_TC); /* the helpers invalidate every packet pointer */
	return ZF_CONTINUE;
}

/* Rewrite the TCP/UDP port of one side, folding diff (the address change) in. */
static __always_inline int zf_set_l4_port(void *ctx, struct zf_pkt *p, int side, __be16 port, __u32 diff,
					  const int hook)
{
	__be16 old;

	if (p->frag == ZF_FRAG_LATER)
		return ZF_CONTINUE; /* no L4 header: the first fragment carried the change */
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *th = zf_l4(p, struct tcphdr);
		__be16 *pp;

		if (!th)
			return ZF_DROP_MALFORMED;
		pp = side == ZF_SIDE_DST ? &th->dest : &th->source;
		old = *pp;
		*pp = port;
		if (hook == ZF_HOOK_TC)
			return zf_tc_l4_csum(ctx, p, p->l4_off + offsetof(struct tcphdr, check), diff, old, port, 0);
		th->check = zf_csum_apply(th->check, zf_csum_diff16(diff, old, port));
	} else if (p->proto == IPPROTO_UDP) {
		struct udphdr *uh = zf_l4(p, struct udphdr);
		__be16 *pp;
		__u16 check;

		if (!uh)
			return ZF_DROP_MALFORMED;
		if (!uh->check && p->family == ZF_AF_INET6)
			return ZF_DROP_UDP6_NO_CSUM; /* zf_balance refuses these earlier */
		pp = side == ZF_SIDE_DST ? &uh->dest : &uh->source;
		old = *pp;
		*pp = port;
		if (hook == ZF_HOOK_TC)
			return zf_tc_l4_csum(ctx, p, p->l4_off + offsetof(struct udphdr, check), diff, old, port,
					     BPF_F_MARK_MANGLED_0);
		if (uh->check) {
			check = zf_csum_apply(uh->check, zf_csum_diff16(diff, old, port));
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
static __always_inline int zf_nat(void *ctx, struct zf_pkt *p, int side, const struct zf_addr *addr,
				  __be16 port, const int hook)
{
	__u32 diff = 0;
	int ret;

	ret = zf_set_l3_addr(p, side, addr, &diff);
	if (ret != ZF_CONTINUE)
		return ret;
	return zf_set_l4_port(ctx, p, side, port, diff, hook);
}

#endif /* ZFAST_NAT_H */
