/* SPDX-License-Identifier: GPL-2.0 */
/*
 * firewall.h: who may open a connection to a public port.
 *
 * Rules are CIDRs in an LPM trie keyed by (port slot, family, address): the
 * longest prefix decides (the control plane writes deny where an allow and a
 * deny have the same prefix).  Slot 0 holds the project-wide deny list, which
 * is checked first.  No match: the port's default policy.
 *
 * The check runs for new flows only; an established flow carries the rule
 * generation it was let in under and is checked again when the rules change,
 * so a revoked source is cut off at its next packet.  Replies pass: they
 * belong to flows the firewall let in.  Two tries alternate: the control plane
 * fills the idle one, then flips zf_config, so a rule set is replaced whole.
 */
#ifndef ZFAST_FIREWALL_H
#define ZFAST_FIREWALL_H

#include "maps.h"
#include "parse.h"

static __always_inline struct fw_rule *zf_fw_match(__u32 trie, __u16 slot, struct zf_pkt *p)
{
	struct fw_key k = {};

	k.prefixlen = 24 + (p->family == ZF_AF_INET ? 32 : 128);
	k.slot[0] = slot >> 8;
	k.slot[1] = slot & 0xff;
	k.family = p->family;
	__builtin_memcpy(k.addr, &p->key.src, 16);
	if (trie)
		return fw_rules1.lookup(&k);
	return fw_rules0.lookup(&k);
}

static __always_inline void zf_count_rule(struct fw_rule *r, __u32 len)
{
	__u32 id = r->id;
	struct zf_counter *c = rule_stats.lookup(&id);

	if (c) {
		c->packets++;
		c->bytes += len;
	}
}

static __always_inline void zf_count_port(__u16 slot, __u32 verdict, __u32 len)
{
	__u32 key = slot * ZF_PORT_VERDICTS + verdict;
	struct zf_counter *c = port_stats.lookup(&key);

	if (c) {
		c->packets++;
		c->bytes += len;
	}
}

/* ZF_CONTINUE when the source may reach public port `slot`, else the drop reason. */
static __always_inline int zf_firewall(struct zf_pkt *p, __u16 slot, struct zf_config *cfg)
{
	__u32 trie = cfg ? cfg->fw_trie : 0;
	__u32 key = slot;
	struct fw_port *port;
	struct fw_rule *r;

	r = zf_fw_match(trie, ZF_FW_PROJECT_SLOT, p);
	if (r && r->action == ZF_FW_DENY) {
		zf_count_rule(r, p->len);
		return ZF_DROP_FW_PROJECT;
	}
	r = zf_fw_match(trie, slot, p);
	if (r) {
		zf_count_rule(r, p->len);
		return r->action == ZF_FW_ALLOW ? ZF_CONTINUE : ZF_DROP_FW_DENY;
	}
	port = fw_ports.lookup(&key);
	if (port && port->policy == ZF_FW_DENY)
		return ZF_DROP_FW_DENY;
	return ZF_CONTINUE;
}

/*
 * New connections per source (a v4 address, a v6 /64) and port: GCRA, the
 * token bucket as one timestamp.  A source may be `burst` connections ahead
 * of its sustained rate.  Concurrent CPUs may race on a source's timestamp;
 * the limit is then approximate, never unbounded.
 */
static __always_inline int zf_rate_limit(struct zf_pkt *p, __u16 slot)
{
	struct rate_key rk = {};
	struct fw_port *port;
	__u32 key = slot;
	__u64 now, *tat, t, tau, next;

	port = fw_ports.lookup(&key);
	if (!port || !port->burst)
		return ZF_CONTINUE;
	rk.slot = slot;
	rk.family = p->family;
	rk.addr[0] = p->key.src.w[0];
	if (p->family == ZF_AF_INET6)
		rk.addr[1] = p->key.src.w[1];
	now = bpf_ktime_get_ns();
	tau = port->interval_ns * (port->burst - 1);
	tat = rate_state.lookup(&rk);
	if (!tat) {
		next = now + port->interval_ns;
		rate_state.update(&rk, &next);
		return ZF_CONTINUE;
	}
	t = *tat > now ? *tat : now;
	if (t - now > tau)
		return ZF_DROP_RATE_LIMIT;
	*tat = t + port->interval_ns;
	return ZF_CONTINUE;
}

#endif /* ZFAST_FIREWALL_H */
