/* SPDX-License-Identifier: GPL-2.0 */
/*
 * verdict.h: one convention for every stage.  A stage returns ZF_CONTINUE
 * when it did not decide, or the zf_reason that ends the packet; the action
 * (redirect, pass, drop) follows from the reason alone (ZF_REASONS).
 */
#ifndef ZFAST_VERDICT_H
#define ZFAST_VERDICT_H

#include "zfast_shared.h"

#define ZF_CONTINUE (-1)

/* Bit r of a mask is set when reason r takes that action.  Masks, not a
 * switch: clang turns a long switch into a jump table, which BPF lacks. */
#define ZF_ACTION_BIT(name, action, want) | ((__u64)(XDP_##action == (want)) << ZF_##name)
#define ZF_MASK_PASS(name, action, desc) ZF_ACTION_BIT(name, action, XDP_PASS)
#define ZF_MASK_DROP(name, action, desc) ZF_ACTION_BIT(name, action, XDP_DROP)
#define ZF_MASK_REDIRECT(name, action, desc) ZF_ACTION_BIT(name, action, XDP_REDIRECT)

static __always_inline int zf_reason_action(int reason)
{
	const __u64 pass = 0 ZF_REASONS(ZF_MASK_PASS);
	const __u64 drop = 0 ZF_REASONS(ZF_MASK_DROP);
	const __u64 redirect = 0 ZF_REASONS(ZF_MASK_REDIRECT);

	if (reason < 0 || reason >= ZF_REASON_MAX)
		return XDP_ABORTED;
	if ((redirect >> reason) & 1)
		return XDP_REDIRECT;
	if ((pass >> reason) & 1)
		return XDP_PASS;
	if ((drop >> reason) & 1)
		return XDP_DROP;
	return XDP_ABORTED;
}

#endif /* ZFAST_VERDICT_H */
