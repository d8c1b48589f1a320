/* SPDX-License-Identifier: GPL-2.0 */
/*
 * maps.h: the data plane's maps.  Every size is a ZF_* constant of
 * zfast_shared.h that the loader may override.  With ZF_PIN_DIR defined the
 * maps live in bpffs under that directory, so a restarted daemon (or a new
 * program) adopts them, flows included, instead of starting empty.
 */
#ifndef ZFAST_MAPS_H
#define ZFAST_MAPS_H

#include "zfast_shared.h"

#ifdef ZF_PIN_DIR
#define ZF_MAP_F(type, key, value, name, size, flags) \
	BPF_TABLE_PINNED(type, key, value, name, size, ZF_PIN_DIR "/" #name, flags)
#else
#define ZF_MAP_F(type, key, value, name, size, flags) \
	BPF_F_TABLE(type, key, value, name, size, flags)
#endif
#define ZF_MAP(type, key, value, name, size) ZF_MAP_F(type, key, value, name, size, 0)

/* Both directions of every balanced connection. */
ZF_MAP("lru_hash", struct flow_key, struct flow_value, flows, ZF_FLOW_TABLE);
/* First fragment's decision, for the fragments that follow it. */
ZF_MAP("lru_hash", struct frag_key, struct flow_value, frags, ZF_FRAG_TABLE);
/* (VIP, port, proto) -> service. */
ZF_MAP("hash", struct service_key, struct service_value, services, ZF_MAX_SERVICE_PORTS);
/* Backend index -> address. */
ZF_MAP("array", u32, struct backend, backends, ZF_MAX_BACKENDS);
/*
 * Maglev lookup tables: rings[ring] is an array of ZF_RING_SIZE slots, slot ->
 * backend index, that the control plane makes for a service when it needs one
 * (zfast/datapath.py write_ring), so the memory is the services' in use, not
 * ZF_MAX_RINGS tables made up front.  ring_template only describes them.
 */
ZF_MAP("array", u32, u32, ring_template, ZF_RING_SIZE);
ZF_MAP("array_of_maps$ring_template", u32, int, rings, ZF_MAX_RINGS);

/* Per-CPU counters: one per reason, per service, per backend. */
ZF_MAP("percpu_array", u32, struct zf_counter, reason_stats, ZF_REASON_MAX);
ZF_MAP("percpu_array", u32, struct zf_counter, service_stats, ZF_MAX_SERVICES);
ZF_MAP("percpu_array", u32, struct zf_counter, backend_stats, ZF_MAX_BACKENDS);

/* Firewall: port policies, two rule tries (one live, one being filled), config. */
ZF_MAP("array", u32, struct fw_port, fw_ports, ZF_MAX_PUBLIC_PORTS);
ZF_MAP_F("lpm_trie", struct fw_key, struct fw_rule, fw_rules0, ZF_MAX_RULES, BPF_F_NO_PREALLOC);
ZF_MAP_F("lpm_trie", struct fw_key, struct fw_rule, fw_rules1, ZF_MAX_RULES, BPF_F_NO_PREALLOC);
ZF_MAP("array", u32, struct zf_config, config, 1);
ZF_MAP("lru_hash", struct rate_key, __u64, rate_state, ZF_RATE_TABLE);
ZF_MAP("percpu_array", u32, struct zf_counter, rule_stats, ZF_MAX_RULES);
ZF_MAP("percpu_array", u32, struct zf_counter, port_stats, ZF_MAX_PUBLIC_PORTS * ZF_PORT_VERDICTS);

/* The pair: VIPs answered while active, interface MACs, new flows for the standby. */
ZF_MAP("hash", struct vip_key, __u32, vips, ZF_MAX_VIPS);
ZF_MAP("array", u32, struct if_mac, if_macs, ZF_MAX_IFINDEX);
BPF_RINGBUF_OUTPUT(flow_events, ZF_SYNC_PAGES);

/* Egress ports XDP frames cannot reach (ZF_TX_KERNEL), indexed by ifindex. */
ZF_MAP("array", u32, u32, tx_flags, ZF_MAX_IFINDEX);

/* Egress ports for XDP_REDIRECT, indexed by ifindex (BCC 0.26 has no devmap_hash). */
BPF_DEVMAP(tx_ports, ZF_MAX_IFINDEX);

#endif /* ZFAST_MAPS_H */
