/* SPDX-License-Identifier: GPL-2.0 */
/*
 * sink.c: count every frame that arrives, then drop it (tools/sink.py).
 * Per-CPU counters: no atomics, no cache line bouncing between CPUs.
 * Slot 0 counts all frames; slot 1 only those whose IPv4 destination is
 * MATCH_V4 (network order, 0: none), so a benchmark can tell balanced
 * traffic from strays.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>

#ifndef MATCH_V4
#define MATCH_V4 0
#endif

struct sink_counter {
	__u64 packets;
	__u64 bytes;
};

BPF_PERCPU_ARRAY(sink_count, struct sink_counter, 2);

int xdp_sink(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 key = 0;
	struct sink_counter *c = sink_count.lookup(&key);

	if (c) {
		c->packets++;
		c->bytes += data_end - data;
	}
#if MATCH_V4
	{
		struct ethhdr *eth = data;
		struct iphdr *iph = data + sizeof(*eth);

		if ((void *)(iph + 1) <= data_end && eth->h_proto == bpf_htons(ETH_P_IP) &&
		    iph->daddr == MATCH_V4) {
			key = 1;
			c = sink_count.lookup(&key);
			if (c) {
				c->packets++;
				c->bytes += data_end - data;
			}
		}
	}
#endif
	return XDP_DROP;
}
