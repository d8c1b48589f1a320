/* SPDX-License-Identifier: GPL-2.0 */
/*
 * parse.h: header parsing with a cursor, one parse_* per header, each
 * checking its bounds before it reads.  Fills struct zf_pkt: where the
 * headers are and the flow key of the packet.
 */
#ifndef ZFAST_PARSE_H
#define ZFAST_PARSE_H

#include "verdict.h"
#include "hook.h"

#define ZF_FRAG_NONE 0
#define ZF_FRAG_FIRST 1 /* offset 0, more to come: carries the L4 header */
#define ZF_FRAG_LATER 2 /* no L4 header */

#define ZF_IP_MF 0x2000
#define ZF_IP_OFFSET 0x1fff

/*
 * Where the headers are is kept as offsets, not pointers: a bounded scalar
 * offset lets the verifier merge the many paths through the parsers (VLAN or
 * not, IPv4 options, IPv6 extension headers) into a few states.
 */
struct zf_pkt {
	void *data;
	void *data_end;
	__u16 l3_off;    /* struct iphdr or struct ipv6hdr */
	__u16 l4_off;    /* TCP/UDP/ICMP header */
	__u32 len;       /* bytes on the wire, for the counters */
	__u32 frag_id;
	__u8 family;     /* ZF_AF_INET / ZF_AF_INET6 */
	__u8 proto;      /* L4 protocol, after any IPv6 extension headers */
	__u8 frag;       /* ZF_FRAG_* */
	__u8 vlan;       /* one 802.1Q/802.1ad tag was present */
	__u8 arp;        /* an ARP packet (parsing stops at PASS_NOT_IP) */
	__u8 syn;        /* a TCP SYN without ACK: a connection starts */
	struct flow_key key;
};

/* Kernel-internal in linux/if_vlan.h and net/ipv6.h; the wire format is all we need. */
struct zf_vlan_hdr {
	__be16 tci;
	__be16 proto;
};

struct zf_rt_hdr {
	__u8 nexthdr;
	__u8 hdrlen;
	__u8 type;
	__u8 segments_left;
};

struct zf_frag_hdr {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;
	__be32 identification;
};

#define ZF_MAX_L4_OFF 0x1ff /* parsing stops before this many bytes */
/* Every header offset is below this (L4 + an ICMP error's quoted headers).
 * The verifier needs offsets bounded well under 64 KiB to check accesses. */
#define ZF_OFF_MASK 0x3ff

/* A header of size bytes at offset off, or NULL when the packet is shorter. */
static __always_inline void *zf_at(struct zf_pkt *p, __u32 off, __u32 size)
{
	void *ptr = p->data + (off & ZF_OFF_MASK);

	if (ptr + size > p->data_end)
		return 0;
	return ptr;
}

#define zf_l3(p, type) ((type *)zf_at(p, (p)->l3_off, sizeof(type)))
#define zf_l4(p, type) ((type *)zf_at(p, (p)->l4_off, sizeof(type)))

/* Ethernet plus at most one VLAN tag; returns the ethertype (network order). */
static __always_inline int parse_eth(struct zf_pkt *p, __be16 *proto)
{
	struct ethhdr *eth = zf_at(p, 0, sizeof(*eth));
	struct zf_vlan_hdr *vh;

	if (!eth)
		return ZF_DROP_MALFORMED;
	p->l3_off = sizeof(*eth);
	*proto = eth->h_proto;
	if (*proto == bpf_htons(ETH_P_8021Q) || *proto == bpf_htons(ETH_P_8021AD)) {
		vh = zf_at(p, sizeof(*eth), sizeof(*vh));
		if (!vh)
			return ZF_DROP_MALFORMED;
		*proto = vh->proto;
		p->l3_off += sizeof(*vh);
		p->vlan = 1;
	}
	return ZF_CONTINUE;
}

static __always_inline int parse_ipv4(struct zf_pkt *p)
{
	struct iphdr *iph = zf_l3(p, struct iphdr);
	__u32 hlen;
	__u16 frag_off;

	if (!iph)
		return ZF_DROP_MALFORMED;
	hlen = iph->ihl * 4;
	if (iph->version != 4 || hlen < sizeof(*iph))
		return ZF_DROP_MALFORMED;
	/* Options are skipped, never read: only their length matters. */
	if (!zf_at(p, p->l3_off, hlen))
		return ZF_DROP_MALFORMED;
	if (bpf_ntohs(iph->tot_len) < hlen)
		return ZF_DROP_MALFORMED;
	p->family = ZF_AF_INET;
	p->proto = iph->protocol;
	p->key.family = ZF_AF_INET;
	p->key.proto = iph->protocol;
	p->key.src.w[0] = iph->saddr;
	p->key.dst.w[0] = iph->daddr;
	frag_off = bpf_ntohs(iph->frag_off);
	if (frag_off & ZF_IP_OFFSET)
		p->frag = ZF_FRAG_LATER;
	else if (frag_off & ZF_IP_MF)
		p->frag = ZF_FRAG_FIRST;
	p->frag_id = iph->id;
	p->l4_off = p->l3_off + hlen;
	return ZF_CONTINUE;
}

static __always_inline void zf_copy_addr6(struct zf_addr *dst, const struct in6_addr *src)
{
	dst->w[0] = src->s6_addr32[0];
	dst->w[1] = src->s6_addr32[1];
	dst->w[2] = src->s6_addr32[2];
	dst->w[3] = src->s6_addr32[3];
}

/* IPv6 and a bounded walk over its extension headers. */
static __always_inline int parse_ipv6(struct zf_pkt *p)
{
	struct ipv6hdr *ip6h = zf_l3(p, struct ipv6hdr);
	__u32 off;
	__u8 next;
	int i;

	if (!ip6h)
		return ZF_DROP_MALFORMED;
	if (ip6h->version != 6)
		return ZF_DROP_MALFORMED;
	p->family = ZF_AF_INET6;
	p->key.family = ZF_AF_INET6;
	zf_copy_addr6(&p->key.src, &ip6h->saddr);
	zf_copy_addr6(&p->key.dst, &ip6h->daddr);
	off = p->l3_off + sizeof(*ip6h);
	next = ip6h->nexthdr;

	for (i = 0; i < ZF_MAX_EXTHDRS; i++) {
		struct ipv6_opt_hdr *opt;

		if (next == IPPROTO_FRAGMENT) {
			struct zf_frag_hdr *fh = zf_at(p, off, sizeof(*fh));
			__u16 frag_off;

			if (!fh)
				return ZF_DROP_MALFORMED;
			frag_off = bpf_ntohs(fh->frag_off);
			if (frag_off & 0xfff8)
				p->frag = ZF_FRAG_LATER;
			else if (frag_off & 1)
				p->frag = ZF_FRAG_FIRST;
			p->frag_id = fh->identification;
			next = fh->nexthdr;
			off += sizeof(*fh);
		} else if (next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING ||
			   next == IPPROTO_DSTOPTS || next == IPPROTO_AH) {
			opt = zf_at(p, off, sizeof(*opt));
			if (!opt)
				return ZF_DROP_MALFORMED;
			if (next == IPPROTO_ROUTING) {
				struct zf_rt_hdr *rt = zf_at(p, off, sizeof(*rt));

				if (!rt)
					return ZF_DROP_MALFORMED;
				/* Segments left: the destination is a waypoint, not the final
				 * one (which the L4 checksum covers); not ours to rewrite. */
				if (rt->segments_left)
					return ZF_PASS_NO_SERVICE;
			}
			if (next == IPPROTO_AH)
				off += (opt->hdrlen + 2) * 4;
			else
				off += (opt->hdrlen + 1) * 8;
			next = opt->nexthdr;
		} else {
			break;
		}
		/* Bounded: lets the verifier treat every walk alike. */
		if (off > ZF_MAX_L4_OFF)
			return ZF_PASS_NO_SERVICE;
		off &= ZF_MAX_L4_OFF;
	}
	/* Still an extension header after the bound: not ours to judge. */
	if (next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS ||
	    next == IPPROTO_AH || next == IPPROTO_FRAGMENT)
		return ZF_PASS_NO_SERVICE;
	p->proto = next;
	p->key.proto = next;
	p->l4_off = off;
	return ZF_CONTINUE;
}

/* TCP or UDP ports; other protocols leave the ports zero. */
static __always_inline int parse_l4(struct zf_pkt *p)
{
	if (p->frag == ZF_FRAG_LATER)
		return ZF_CONTINUE;
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *th = zf_l4(p, struct tcphdr);

		if (!th || th->doff < 5)
			return ZF_DROP_MALFORMED;
		p->syn = th->syn && !th->ack;
		p->key.sport = th->source;
		p->key.dport = th->dest;
	} else if (p->proto == IPPROTO_UDP) {
		struct udphdr *uh = zf_l4(p, struct udphdr);

		if (!uh)
			return ZF_DROP_MALFORMED;
		p->key.sport = uh->source;
		p->key.dport = uh->dest;
	}
	return ZF_CONTINUE;
}

/* Point p at the packet again: after a helper that may move it, as at the start. */
static __always_inline void zf_reload(void *ctx, struct zf_pkt *p, const int hook)
{
	p->data = (void *)(long)zf_ctx_get(ctx, hook, data);
	p->data_end = (void *)(long)zf_ctx_get(ctx, hook, data_end);
}

static __always_inline int parse_packet(void *ctx, struct zf_pkt *p, const int hook)
{
	__be16 proto;
	int ret;

	zf_reload(ctx, p, hook);
	/* An skb's length counts its paged part too (a GSO packet: all its segments). */
	p->len = hook == ZF_HOOK_TC ? ((struct __sk_buff *)ctx)->len : p->data_end - p->data;
	ret = parse_eth(p, &proto);
	if (ret != ZF_CONTINUE)
		return ret;
	if (proto == bpf_htons(ETH_P_IP))
		ret = parse_ipv4(p);
	else if (proto == bpf_htons(ETH_P_IPV6))
		ret = parse_ipv6(p);
	else {
		p->arp = proto == bpf_htons(ETH_P_ARP);
		return ZF_PASS_NOT_IP;
	}
	if (ret != ZF_CONTINUE)
		return ret;
	return parse_l4(p);
}

#endif /* ZFAST_PARSE_H */
