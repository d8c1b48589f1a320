/* SPDX-License-Identifier: GPL-2.0 */
/*
 * ha.h: what the data plane does for the active/standby pair.
 *
 *  - While its lease (zf_config.active_until_ns) runs, the active node answers
 *    ARP requests and IPv6 neighbour solicitations for the pair's VIPs itself,
 *    from XDP: the answer is redirected out of the port the question came in on
 *    (XDP_TX of a frame that reached a veth as an skb never arrived at the
 *    peer here; a redirect to the same port does).  The VIPs are not kernel addresses: when the daemon
 *    dies or freezes, the lease runs out and the node stops claiming them on
 *    its own, before the standby's dead interval ends and it takes them.
 *  - New flows are reported on the flow_events ring buffer, which the daemon
 *    streams to the standby.
 */
#ifndef ZFAST_HA_H
#define ZFAST_HA_H

#include "csum.h"
#include "maps.h"
#include "parse.h"

#define ZF_ARPHRD_ETHER 1
#define ZF_ARPOP_REQUEST 1
#define ZF_ARPOP_REPLY 2
#define ZF_ND_SOLICIT 135
#define ZF_ND_ADVERT 136
#define ZF_ND_OPT_SLLA 1
#define ZF_ND_OPT_TLLA 2

struct zf_arp {
	__be16 htype;
	__be16 ptype;
	__u8 hlen;
	__u8 plen;
	__be16 op;
	__u8 sha[6];
	__u8 spa[4];
	__u8 tha[6];
	__u8 tpa[4];
};

/* An NS or NA with one link-layer address option: the only size we send. */
struct zf_nd {
	__u8 type;
	__u8 code;
	__sum16 check;
	__be32 flags;
	__be32 target[4];
	__u8 opt_type;
	__u8 opt_len;
	__u8 opt_mac[6];
};

static __always_inline int zf_active(struct zf_config *cfg)
{
	return cfg && bpf_ktime_get_ns() < cfg->active_until_ns;
}

static __always_inline int zf_holds_vip(struct zf_addr *addr, __u8 family)
{
	struct vip_key k = {};
	__u32 zero = 0;

	k.addr = *addr;
	k.family = family;
	if (!vips.lookup(&k))
		return 0;
	return zf_active(config.lookup(&zero));
}

static __always_inline __u8 *zf_my_mac(void *ctx, const int hook)
{
	__u32 idx = zf_ctx_ifindex(ctx, hook);
	struct if_mac *m = if_macs.lookup(&idx);

	if (!m || !(m->mac[0] | m->mac[1] | m->mac[2] | m->mac[3] | m->mac[4] | m->mac[5]))
		return 0;
	return m->mac;
}

/* An ARP request for a VIP we hold becomes our reply, sent back where it came from. */
static __always_inline int zf_arp(void *ctx, struct zf_pkt *p, const int hook)
{
	struct zf_arp *arp = zf_at(p, p->l3_off, sizeof(struct zf_arp));
	struct ethhdr *eth = zf_at(p, 0, sizeof(*eth));
	struct zf_addr target = {};
	__u8 *mac;

	if (!arp || !eth)
		return ZF_PASS_NOT_IP;
	if (arp->htype != bpf_htons(ZF_ARPHRD_ETHER) || arp->ptype != bpf_htons(ETH_P_IP) ||
	    arp->hlen != 6 || arp->plen != 4 || arp->op != bpf_htons(ZF_ARPOP_REQUEST))
		return ZF_PASS_NOT_IP;
	__builtin_memcpy(&target.w[0], arp->tpa, 4);
	if (!zf_holds_vip(&target, ZF_AF_INET))
		return ZF_PASS_NOT_IP;
	mac = zf_my_mac(ctx, hook);
	if (!mac)
		return ZF_PASS_NOT_IP;

	arp->op = bpf_htons(ZF_ARPOP_REPLY);
	__builtin_memcpy(arp->tha, arp->sha, 6);
	__builtin_memcpy(arp->tpa, arp->spa, 4);
	__builtin_memcpy(arp->sha, mac, 6);
	__builtin_memcpy(arp->spa, &target.w[0], 4);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, mac, ETH_ALEN);
	bpf_redirect(zf_ctx_ifindex(ctx, hook), 0);
	return ZF_TX_ARP;
}

/* Sum of n 16-bit words, n a constant: the NA's checksum is made from scratch. */
static __always_inline __u32 zf_sum16(void *data, int n, __u32 sum)
{
	__u16 *w = data;
	int i;

#pragma unroll
	for (i = 0; i < n; i++)
		sum += w[i];
	return sum;
}

/*
 * A neighbour solicitation for a VIP we hold becomes our advertisement
 * (solicited, override), sent back where it came from.  The packet is first
 * made exactly the size of an NA with one option.  ZF_CONTINUE: not an NS
 * for us, the packet untouched; anything else ends the packet (after
 * bpf_xdp_adjust_tail no earlier packet pointer may be used again).
 */
static __always_inline int zf_nd(void *ctx, struct zf_pkt *p, const int hook)
{
	struct ipv6hdr *ip6h = zf_l3(p, struct ipv6hdr);
	struct zf_nd *nd = zf_l4(p, struct zf_nd);
	struct zf_addr target = {}, src = {};
	struct ethhdr *eth;
	__u32 want, sum = 0;
	__u8 *mac, mac_copy[6];
	int i;

	if (!ip6h || p->l4_off != p->l3_off + sizeof(*ip6h))
		return ZF_CONTINUE; /* extension headers: not an NS we answer */
	/* The fixed part of an NS: the option may be missing. */
	if (!zf_at(p, p->l4_off, 24))
		return ZF_CONTINUE;
	nd = zf_at(p, p->l4_off, 24);
	if (!nd || nd->type != ZF_ND_SOLICIT || nd->code != 0 || ip6h->hop_limit != 255)
		return ZF_CONTINUE;
	zf_copy_addr6(&src, &ip6h->saddr);
	if (!(src.w[0] | src.w[1] | src.w[2] | src.w[3]))
		return ZF_CONTINUE; /* duplicate address detection: not ours to answer */
#pragma unroll
	for (i = 0; i < 4; i++)
		target.w[i] = nd->target[i];
	if (!zf_holds_vip(&target, ZF_AF_INET6))
		return ZF_CONTINUE;
	mac = zf_my_mac(ctx, hook);
	if (!mac)
		return ZF_CONTINUE;
	__builtin_memcpy(mac_copy, mac, 6);

	want = p->l4_off + sizeof(struct zf_nd);
	if (hook == ZF_HOOK_TC ? bpf_skb_change_tail(ctx, want, 0) : bpf_xdp_adjust_tail(ctx, (int)want - (int)p->len))
		return ZF_PASS_NO_SERVICE;
	zf_reload(ctx, p, hook);
	eth = zf_at(p, 0, sizeof(*eth));
	ip6h = zf_l3(p, struct ipv6hdr);
	nd = zf_l4(p, struct zf_nd);
	if (!eth || !ip6h || !nd)
		return ZF_DROP_MALFORMED;

	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, mac_copy, ETH_ALEN);
	ip6h->payload_len = bpf_htons(sizeof(struct zf_nd));
	ip6h->hop_limit = 255;
#pragma unroll
	for (i = 0; i < 4; i++) {
		ip6h->daddr.s6_addr32[i] = src.w[i];
		ip6h->saddr.s6_addr32[i] = target.w[i];
	}
	nd->type = ZF_ND_ADVERT;
	nd->code = 0;
	nd->check = 0;
	nd->flags = bpf_htonl(0x60000000); /* solicited, override */
	nd->opt_type = ZF_ND_OPT_TLLA;
	nd->opt_len = 1;
	__builtin_memcpy(nd->opt_mac, mac_copy, 6);

	/* pseudo header (addresses, length, next header) + the 32-byte NA */
	sum = zf_sum16(&ip6h->saddr, 16, 0);
	sum += bpf_htons(sizeof(struct zf_nd));
	sum += bpf_htons(IPPROTO_ICMPV6);
	sum = zf_sum16(nd, sizeof(struct zf_nd) / 2, sum);
	nd->check = ~zf_csum_fold(sum);
	p->len = want;
	bpf_redirect(zf_ctx_ifindex(ctx, hook), 0);
	return ZF_TX_ND;
}

/* Tell the daemon about a new flow, for the standby (only while a peer listens). */
static __always_inline void zf_flow_report(struct flow_key *key, struct flow_value *value,
					   struct zf_config *cfg)
{
	struct flow_event ev;

	if (!cfg || !cfg->sync)
		return;
	ev.key = *key;
	ev.value = *value;
	flow_events.ringbuf_output(&ev, sizeof(ev), 0);
}

#endif /* ZFAST_HA_H */
