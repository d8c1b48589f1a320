/* SPDX-License-Identifier: GPL-2.0 */
/*
 * icmp.h: ICMP errors about balanced flows (destination unreachable, frag
 * needed / packet too big, time exceeded, parameter problem).
 *
 * An error quotes the packet that caused it.  The quoted packet, read
 * backwards, is a key of the flow table:
 *  - a quoted reply (VIP -> client) gives the forward entry: the error is on
 *    its way to the VIP and must reach the backend that sent the reply, so the
 *    outer destination and the quoted source become the backend's;
 *  - a quoted forward packet (client -> backend) gives the reply entry: the
 *    error is on its way to the client, which only knows the VIP, so the quoted
 *    destination (and the outer source, when the backend itself complains)
 *    become the VIP's.
 * The ICMP checksum follows every byte changed; the quoted L4 checksum is
 * left as it is (it covers bytes the error no longer carries).
 */
#ifndef ZFAST_ICMP_H
#define ZFAST_ICMP_H

#include "flows.h"
#include "nat.h"

#define ZF_ICMP_DEST_UNREACH 3
#define ZF_ICMP_TIME_EXCEEDED 11
#define ZF_ICMP_PARAMETERPROB 12
#define ZF_ICMP6_DEST_UNREACH 1
#define ZF_ICMP6_PKT_TOOBIG 2
#define ZF_ICMP6_TIME_EXCEED 3
#define ZF_ICMP6_PARAMPROB 4

struct zf_icmp_hdr {
	__u8 type;
	__u8 code;
	__sum16 check;
	__be32 rest;
};

/* The first 4 bytes of TCP and UDP: the quoted ports. */
struct zf_ports {
	__be16 src;
	__be16 dst;
};

static __always_inline int zf_icmp_is_error(struct zf_pkt *p, __u8 type)
{
	if (p->family == ZF_AF_INET)
		return type == ZF_ICMP_DEST_UNREACH || type == ZF_ICMP_TIME_EXCEEDED ||
		       type == ZF_ICMP_PARAMETERPROB;
	return type == ZF_ICMP6_DEST_UNREACH || type == ZF_ICMP6_PKT_TOOBIG ||
	       type == ZF_ICMP6_TIME_EXCEED || type == ZF_ICMP6_PARAMPROB;
}

/*
 * Rewrite a quoted address, adding the change to *diff.  Each family checks
 * its own bounds: clang may otherwise load a v6-sized address on the v4 path.
 */
static __always_inline int zf_rewrite_quoted(struct zf_pkt *p, __be32 *a, const struct zf_addr *addr,
					     __u32 *diff)
{
	int i;

	if (p->family == ZF_AF_INET) {
		if ((void *)(a + 1) > p->data_end)
			return ZF_DROP_MALFORMED;
		*diff = zf_csum_diff32(*diff, a[0], addr->w[0]);
		a[0] = addr->w[0];
		return ZF_CONTINUE;
	}
	if ((void *)(a + 4) > p->data_end)
		return ZF_DROP_MALFORMED;
#pragma unroll
	for (i = 0; i < 4; i++) {
		*diff = zf_csum_diff32(*diff, a[i], addr->w[i]);
		a[i] = addr->w[i];
	}
	return ZF_CONTINUE;
}

/*
 * Returns ZF_CONTINUE with the packet rewritten and *fv set, or the reason to
 * stop (not an error, not ours, malformed).
 */
static __always_inline int zf_icmp_error(struct zf_pkt *p, struct flow_value **fvp)
{
	struct zf_icmp_hdr *ih = zf_l4(p, struct zf_icmp_hdr);
	struct flow_key key = {};
	struct flow_value *fv;
	struct zf_ports *ports;
	__be32 *q_src, *q_dst;  /* quoted addresses */
	__sum16 *q_check = 0;   /* quoted IPv4 header checksum */
	__u32 icmp_diff = 0, q_diff = 0, outer_diff = 0;
	int ret;

	if (!ih)
		return ZF_DROP_MALFORMED;
	if (!zf_icmp_is_error(p, ih->type))
		return ZF_PASS_NO_SERVICE;

	if (p->family == ZF_AF_INET) {
		struct iphdr *q = (void *)(ih + 1);
		__u32 hlen;

		if ((void *)(q + 1) > p->data_end)
			return ZF_DROP_MALFORMED;
		hlen = q->ihl * 4;
		if (hlen < sizeof(*q) || hlen > 60)
			return ZF_DROP_MALFORMED;
		ports = (void *)q + hlen;
		if ((void *)(ports + 1) > p->data_end)
			return ZF_DROP_MALFORMED;
		key.proto = q->protocol;
		key.src.w[0] = q->daddr;
		key.dst.w[0] = q->saddr;
		q_src = &q->saddr;
		q_dst = &q->daddr;
		q_check = &q->check;
	} else {
		struct ipv6hdr *q = (void *)(ih + 1);

		if ((void *)(q + 1) > p->data_end)
			return ZF_DROP_MALFORMED;
		ports = (void *)(q + 1);
		if ((void *)(ports + 1) > p->data_end)
			return ZF_DROP_MALFORMED;
		key.proto = q->nexthdr;
		zf_copy_addr6(&key.src, &q->daddr);
		zf_copy_addr6(&key.dst, &q->saddr);
		q_src = q->saddr.s6_addr32;
		q_dst = q->daddr.s6_addr32;
	}
	if (key.proto != IPPROTO_TCP && key.proto != IPPROTO_UDP)
		return ZF_PASS_NO_SERVICE;
	key.family = p->family;
	key.sport = ports->dst;
	key.dport = ports->src;
	fv = flows.lookup(&key);
	if (!fv)
		return ZF_PASS_NO_SERVICE;
	*fvp = fv;

	if (fv->dir == ZF_DIR_FORWARD) {
		/* Error about a reply: to the backend that sent it. */
		ret = zf_set_l3_addr(p, ZF_SIDE_DST, &fv->addr, &outer_diff);
		if (ret != ZF_CONTINUE)
			return ret;
		ret = zf_rewrite_quoted(p, q_src, &fv->addr, &q_diff);
		if (ret != ZF_CONTINUE)
			return ret;
		icmp_diff = zf_csum_diff16(q_diff, ports->src, fv->port);
		ports->src = fv->port;
	} else {
		/* Error about a forward packet: to the client, as from the VIP. */
		struct zf_addr outer_src = {};

		/* The backend itself complains (say, UDP port unreachable): hide it too. */
		if (p->family == ZF_AF_INET) {
			struct iphdr *iph = zf_l3(p, struct iphdr);

			if (!iph)
				return ZF_DROP_MALFORMED;
			outer_src.w[0] = iph->saddr;
		} else {
			struct ipv6hdr *ip6h = zf_l3(p, struct ipv6hdr);

			if (!ip6h)
				return ZF_DROP_MALFORMED;
			zf_copy_addr6(&outer_src, &ip6h->saddr);
		}
		if (outer_src.w[0] == key.src.w[0] && outer_src.w[1] == key.src.w[1] &&
		    outer_src.w[2] == key.src.w[2] && outer_src.w[3] == key.src.w[3]) {
			ret = zf_set_l3_addr(p, ZF_SIDE_SRC, &fv->addr, &outer_diff);
			if (ret != ZF_CONTINUE)
				return ret;
		}
		ret = zf_rewrite_quoted(p, q_dst, &fv->addr, &q_diff);
		if (ret != ZF_CONTINUE)
			return ret;
		icmp_diff = zf_csum_diff16(q_diff, ports->dst, fv->port);
		ports->dst = fv->port;
	}

	if (q_check) {
		/* The quoted IPv4 header checksum changes, and is itself ICMP payload. */
		__u16 old = *q_check;

		*q_check = zf_csum_apply(old, q_diff);
		icmp_diff = zf_csum_diff16(icmp_diff, old, *q_check);
	}
	/* ICMPv6 sums a pseudo header too: the outer addresses count. */
	if (p->family == ZF_AF_INET6)
		icmp_diff = zf_csum_add(icmp_diff, outer_diff);
	ih->check = zf_csum_apply(ih->check, icmp_diff);
	return ZF_CONTINUE;
}

#endif /* ZFAST_ICMP_H */
