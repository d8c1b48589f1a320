/* SPDX-License-Identifier: GPL-2.0 */
/*
 * zfast.c: the entry points of a zfast balancer: XDP and tc, one pipeline.
 *
 * One program serves every interface of a node: packets to a service's VIP
 * are balanced to a backend (destination rewritten), the backends' replies
 * are rewritten back to the VIP, and both leave through the FIB and the
 * devmap.  Everything else goes to the kernel untouched.  Each packet ends in
 * exactly one reason (zfast_shared.h), counted at the single exit.
 */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>

#include "zfast_shared.h"
#include "verdict.h"
#include "hook.h"
#include "maps.h"
#include "parse.h"
#include "csum.h"
#include "nat.h"
#include "flows.h"
#include "icmp.h"
#include "firewall.h"
#include "ha.h"
#include "forward.h"
#include "stats.h"

/* A packet of a known flow, or of a new flow to a service. */
static __always_inline int zf_balance(void *ctx, struct zf_pkt *p, const int hook)
{
	struct flow_value *fv, new_fv = {}, *cache;
	struct service_value *svc;
	struct service_key sk = {};
	struct zf_config *cfg;
	int reason = ZF_FWD_FLOW, ret;
	__u32 zero = 0;

	cfg = config.lookup(&zero);
	fv = flows.lookup(&p->key);
	if (fv && fv->dir == ZF_DIR_FORWARD) {
		if (p->syn || zf_backend_down(fv->backend)) {
			/*
			 * A new connection on a reused 5-tuple, or a flow whose backend is
			 * unhealthy: balance it again (a retransmitted SYN picks the same
			 * backend: Maglev is deterministic).
			 */
			fv = 0;
		} else if (fv->fw_port && cfg && fv->fw_gen != (__u16)cfg->fw_gen) {
			/* The rules changed since this flow was let in: ask again. */
			ret = zf_firewall(p, fv->fw_port, cfg);
			if (ret != ZF_CONTINUE) {
				zf_count_port(fv->fw_port, ZF_PORT_DENIED, p->len);
				flows.delete(&p->key);
				return ret;
			}
			fv->fw_gen = cfg->fw_gen;
		}
	}
	if (!fv) {
		sk.vip = p->key.dst;
		sk.port = p->key.dport;
		sk.proto = p->key.proto;
		sk.family = p->key.family;
		svc = services.lookup(&sk);
		if (!svc)
			return ZF_PASS_NO_SERVICE;
		if (svc->fw_port) {
			/* Denied or limited sources never get a flow entry. */
			ret = zf_firewall(p, svc->fw_port, cfg);
			if (ret == ZF_CONTINUE)
				ret = zf_rate_limit(p, svc->fw_port);
			if (ret != ZF_CONTINUE) {
				zf_count_port(svc->fw_port, ret == ZF_DROP_RATE_LIMIT ? ZF_PORT_LIMITED : ZF_PORT_DENIED,
					      p->len);
				return ret;
			}
		}
		if (zf_ttl_expires(p))
			return ZF_PASS_TTL;
		if (zf_udp6_no_csum(p))
			return ZF_DROP_UDP6_NO_CSUM; /* before any flow entry or counter */
		ret = zf_flow_new(p, svc, cfg ? cfg->fw_gen : 0, &new_fv);
		if (ret != ZF_CONTINUE)
			return ret;
		zf_flow_report(&p->key, &new_fv, cfg);
		fv = &new_fv;
		reason = ZF_FWD_NEW;
		cache = 0; /* the next packet fills the cache of the entry in the map */
	} else if (zf_ttl_expires(p)) {
		return ZF_PASS_TTL;
	} else {
		cache = fv;
		/* Alive for the idle sweep: written only once a sweep period. */
		if ((fv->flags & (ZF_FLOW_SEEN | ZF_FLOW_AGED)) != ZF_FLOW_SEEN)
			fv->flags = (fv->flags | ZF_FLOW_SEEN) & ~ZF_FLOW_AGED;
	}

	if (fv->dir == ZF_DIR_FORWARD) {
		ret = zf_nat(ctx, p, ZF_SIDE_DST, &fv->addr, fv->port, hook);
		if (ret == ZF_CONTINUE) {
			zf_count_service(fv->service, fv->backend, p->len);
			if (fv->fw_port)
				zf_count_port(fv->fw_port, ZF_PORT_ALLOWED, p->len);
		}
	} else {
		ret = zf_nat(ctx, p, ZF_SIDE_SRC, &fv->addr, fv->port, hook);
		reason = ZF_FWD_REPLY;
	}
	if (ret != ZF_CONTINUE)
		return ret;
	if (p->frag == ZF_FRAG_FIRST)
		zf_frag_remember(p, fv);
	return zf_forward(ctx, p, reason, cache, cfg, hook);
}

/* A fragment after the first: it follows the first one's decision. */
static __always_inline int zf_fragment(void *ctx, struct zf_pkt *p, const int hook)
{
	struct flow_value *fv = zf_frag_lookup(p);
	__u32 diff = 0;
	int ret;

	if (!fv)
		return ZF_PASS_FRAGMENT;
	if (zf_ttl_expires(p))
		return ZF_PASS_TTL;
	ret = zf_set_l3_addr(p, fv->dir == ZF_DIR_FORWARD ? ZF_SIDE_DST : ZF_SIDE_SRC, &fv->addr, &diff);
	if (ret != ZF_CONTINUE)
		return ret;
	if (fv->dir == ZF_DIR_FORWARD)
		zf_count_service(fv->service, fv->backend, p->len);
	return zf_forward(ctx, p, ZF_FWD_FRAGMENT, 0, 0, hook);
}

static __always_inline int zf_process(void *ctx, struct zf_pkt *p, const int hook)
{
	struct flow_value *fv = 0;
	int ret;

	ret = parse_packet(ctx, p, hook);
	if (ret == ZF_PASS_NOT_IP && p->arp)
		return zf_arp(ctx, p, hook);
	if (ret != ZF_CONTINUE)
		return ret;
	if (p->frag == ZF_FRAG_LATER)
		return zf_fragment(ctx, p, hook);
	if (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP)
		return zf_balance(ctx, p, hook);
	if (p->family == ZF_AF_INET6 && p->proto == IPPROTO_ICMPV6) {
		ret = zf_nd(ctx, p, hook);
		if (ret != ZF_CONTINUE)
			return ret;
	}
	if ((p->family == ZF_AF_INET && p->proto == IPPROTO_ICMP) ||
	    (p->family == ZF_AF_INET6 && p->proto == IPPROTO_ICMPV6)) {
		if (zf_ttl_expires(p))
			return ZF_PASS_TTL;
		ret = zf_icmp_error(p, &fv);
		if (ret != ZF_CONTINUE)
			return ret;
		return zf_forward(ctx, p, ZF_FWD_ICMP, 0, 0, hook);
	}
	return ZF_PASS_NO_SERVICE;
}

/* Physical and virtio NICs: in the driver, before an skb exists. */
int xdp_zfast(struct xdp_md *ctx)
{
	struct zf_pkt p = {};
	int reason = zf_process(ctx, &p, ZF_HOOK_XDP);

	return zf_count_reason(reason, p.len, ZF_HOOK_XDP);
}

/* Virtual interfaces (veth, bridge ports): tc ingress, on the skb (hook.h says why). */
int tc_zfast(struct __sk_buff *skb)
{
	struct zf_pkt p = {};
	int reason;

	zf_tc_pull(skb);
	reason = zf_process(skb, &p, ZF_HOOK_TC);
	return zf_count_reason(reason, p.len, ZF_HOOK_TC);
}
