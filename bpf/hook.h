/* SPDX-License-Identifier: GPL-2.0 */
/*
 * hook.h: one pipeline, two kernel hooks.
 *
 * Every stage that touches the context takes `hook` as a compile-time
 * constant: xdp_zfast and tc_zfast (zfast.c) run the same code, and after
 * inlining each keeps only its own branches (a helper of the other hook is
 * never in its instructions, so the verifier never sees it).
 *  - XDP, in the driver, before an skb exists: physical and virtio NICs.
 *  - tc (sched_cls at ingress, direct action), on the skb: virtual interfaces
 *    (veth, bridge ports).  A sender on the same host hands such a packet over
 *    with a partial checksum (TX checksum offload), a state only the skb knows
 *    and only the kernel's checksum helpers honour; and an skb redirected into
 *    a veth needs no NAPI on its peer.  docs/datapath.md says why in full.
 */
#ifndef ZFAST_HOOK_H
#define ZFAST_HOOK_H

#include <linux/pkt_cls.h>

#define ZF_HOOK_XDP 0
#define ZF_HOOK_TC 1

/* A field both contexts have (data, data_end). */
#define zf_ctx_get(ctx, hook, field) \
	((hook) == ZF_HOOK_TC ? ((struct __sk_buff *)(ctx))->field : ((struct xdp_md *)(ctx))->field)

/* The port the packet came in on: at tc ingress the skb's device is that port. */
#define zf_ctx_ifindex(ctx, hook) \
	((hook) == ZF_HOOK_TC ? ((struct __sk_buff *)(ctx))->ifindex : ((struct xdp_md *)(ctx))->ingress_ifindex)

/* Enough linear bytes for every header we parse, an ICMP error's quote included. */
#define ZF_TC_PULL_LEN 256

/*
 * An skb may carry its headers in paged fragments (GRO, a copy-less sender);
 * the parsers read the linear part only, so pull the headers into it.
 */
static __always_inline void zf_tc_pull(struct __sk_buff *skb)
{
	__u32 len = skb->len;

	if ((void *)(long)skb->data + ZF_TC_PULL_LEN > (void *)(long)skb->data_end)
		bpf_skb_pull_data(skb, len < ZF_TC_PULL_LEN ? len : ZF_TC_PULL_LEN);
}

/* The hook's own return code for an XDP action. */
static __always_inline int zf_hook_action(int xdp_action, const int hook)
{
	if (hook != ZF_HOOK_TC)
		return xdp_action;
	if (xdp_action == XDP_REDIRECT)
		return TC_ACT_REDIRECT;
	if (xdp_action == XDP_PASS)
		return TC_ACT_OK;
	return TC_ACT_SHOT;
}

#endif /* ZFAST_HOOK_H */
