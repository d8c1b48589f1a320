/* SPDX-License-Identifier: GPL-2.0 */
/*
 * stats.h: per-CPU counters.  Every packet is counted once under its
 * reason at the program's single exit; packets that clients send to a
 * service are counted once more under that service and its backend.
 */
#ifndef ZFAST_STATS_H
#define ZFAST_STATS_H

#include "maps.h"
#include "hook.h"

static __always_inline void zf_count(struct zf_counter *c, __u32 len)
{
	if (c) {
		c->packets++;
		c->bytes += len;
	}
}

static __always_inline void zf_count_service(__u32 service, __u32 backend, __u32 len)
{
	zf_count(service_stats.lookup(&service), len);
	zf_count(backend_stats.lookup(&backend), len);
}

static __always_inline int zf_count_reason(int reason, __u32 len, const int hook)
{
	__u32 key = reason;

	zf_count(reason_stats.lookup(&key), len);
	return zf_hook_action(zf_reason_action(reason), hook);
}

#endif /* ZFAST_STATS_H */
