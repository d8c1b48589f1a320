/* SPDX-License-Identifier: GPL-2.0 */
/*
 * zfast_shared.h: every type and constant that the data plane and the
 * control plane both know.
 *
 * The Python side never repeats these layouts: map keys and values come from
 * BCC's ctypes classes (bpf["map"].Key / .Leaf), and the verdict names are
 * read from ZF_REASONS below by zfast/reasons.py.  Change a struct here and
 * both sides follow.
 */
#ifndef ZFAST_SHARED_H
#define ZFAST_SHARED_H

/* ---- Sizes: compile-time defaults, overridden by the loader with -D ---- */
#ifndef ZF_FLOW_TABLE
#define ZF_FLOW_TABLE 65536     /* LRU flow entries (two per connection) */
#endif
#ifndef ZF_FRAG_TABLE
#define ZF_FRAG_TABLE 4096      /* datagrams being fragmented right now */
#endif
#ifndef ZF_MAX_SERVICES
#define ZF_MAX_SERVICES 64      /* services (stats slots) */
#endif
#ifndef ZF_MAX_SERVICE_PORTS
#define ZF_MAX_SERVICE_PORTS 1024 /* (VIP, port, proto) entries */
#endif
#ifndef ZF_MAX_BACKENDS
#define ZF_MAX_BACKENDS 4096
#endif
#ifndef ZF_RING_SIZE
#define ZF_RING_SIZE 65537      /* Maglev table size: a prime */
#endif
#ifndef ZF_MAX_RINGS
#define ZF_MAX_RINGS (2 * ZF_MAX_SERVICES) /* two per service: swap, not edit */
#endif
#ifndef ZF_MAX_IFINDEX
#define ZF_MAX_IFINDEX 4096     /* devmap slots, indexed by ifindex */
#endif
#ifndef ZF_MAX_PUBLIC_PORTS
#define ZF_MAX_PUBLIC_PORTS 256 /* firewalled public ports; slot 0 = project-wide */
#endif
#ifndef ZF_MAX_RULES
#define ZF_MAX_RULES 131072     /* CIDR rules in each of the two rule tries */
#endif
#ifndef ZF_MAX_VIPS
#define ZF_MAX_VIPS 256         /* addresses this node answers ARP/ND for while active */
#endif
#ifndef ZF_SYNC_PAGES
#define ZF_SYNC_PAGES 256       /* ring buffer of new flows for the standby (4 KiB pages) */
#endif
#ifndef ZF_RATE_TABLE
#define ZF_RATE_TABLE 65536     /* sources tracked by the new-connection rate limit */
#endif
#define ZF_MAX_EXTHDRS 6        /* IPv6 extension headers walked at most */

/* ---- Address families as stored in keys ---- */
#define ZF_AF_INET 4
#define ZF_AF_INET6 6

/* ---- The flow hash: murmur3's mixing, seeded (bpf/flows.h; its twin in Python is
 * zfast/dataplane/flowhash.py, the end-to-end tests' oracle of where a flow lands) ---- */
#define ZF_HASH_SEED 0x7a66
#define ZF_MURMUR_C1 0xcc9e2d51
#define ZF_MURMUR_C2 0x1b873593
#define ZF_MURMUR_N 0xe6546b64
#define ZF_MURMUR_F1 0x85ebca6b /* finalizer */
#define ZF_MURMUR_F2 0xc2b2ae35

/* A v4 or v6 address; a v4 address sits in w[0], the rest is zero. */
struct zf_addr {
	__be32 w[4];
};

/* A flow as seen on the wire, in the direction the packet travels. */
struct flow_key {
	struct zf_addr src;
	struct zf_addr dst;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 family;
	__u16 pad;
};

/*
 * flow_value.flags: the idle-flow sweep (zfast/flowage.py) ages entries like a
 * page table's accessed bit.  A packet of the flow sets SEEN (one write per sweep
 * period at most); a sweep turns SEEN into nothing and nothing into AGED, and deletes
 * a forward entry still AGED (no packet for a whole period) with its reply entry.
 */
#define ZF_FLOW_SEEN 1
#define ZF_FLOW_AGED 2

#define ZF_DIR_FORWARD 1 /* client -> VIP: rewrite the destination */
#define ZF_DIR_REPLY 2   /* backend -> client: rewrite the source */

/* What to do with packets of a flow: one entry per direction. */
struct flow_value {
	struct zf_addr addr; /* forward: backend address; reply: the VIP */
	__be16 port;         /* forward: target port; reply: the service port */
	__u8 dir;            /* ZF_DIR_* */
	__u8 flags;
	__u32 service;       /* service index (stats slot) */
	__u32 backend;       /* backend index (stats slot, health) */
	__u16 fw_port;       /* public port slot whose firewall let it in; 0 = none */
	__u16 fw_gen;        /* rule generation it was checked against */
	/*
	 * The FIB's answer for this flow's rewritten packets, cached: a FIB lookup
	 * costs more than the rest of the path.  Valid while nh_gen equals
	 * zf_config.nh_gen, which the daemon bumps on every route or neighbour
	 * change (and every few seconds regardless).
	 */
	__u32 nh_ifindex;
	__u8 nh_dmac[6];
	__u8 nh_smac[6];
	__u16 nh_gen;
	__u16 pad;
};

/* Fragments after the first carry no ports: they follow their first one. */
struct frag_key {
	struct zf_addr src;
	struct zf_addr dst;
	__u32 id;
	__u8 proto;
	__u8 family;
	__u16 pad;
};

struct service_key {
	struct zf_addr vip;
	__be16 port;
	__u8 proto;
	__u8 family;
};

struct service_value {
	__u32 index;         /* service index: stats slot */
	__u32 ring;          /* Maglev ring in use: rings[ring], an array of ZF_RING_SIZE slots */
	__be16 target_port;  /* port on the backends */
	__u16 flags;
	__u16 fw_port;       /* public port slot (firewall, counters); 0 = a private VIP */
	__u16 pad;
};

/* ---- Firewall of the public ports ---- */

#define ZF_FW_ALLOW 1
#define ZF_FW_DENY 2
#define ZF_FW_PROJECT_SLOT 0 /* the project-wide deny list's slot in the rule tries */

/* Per public port slot: default policy and new-connection rate limit. */
struct fw_port {
	__u8 policy;         /* ZF_FW_ALLOW / ZF_FW_DENY when no rule matches */
	__u8 pad[3];
	__u32 burst;         /* new connections a source may open at once; 0 = no limit */
	__u64 interval_ns;   /* one new connection per interval, sustained */
};

/*
 * LPM key: the prefix covers slot and family (24 bits) then the address, so
 * one trie holds every port's rules, v4 and v6.  Slot 0 is the project-wide
 * deny list.
 */
struct fw_key {
	__u32 prefixlen;     /* 24 + CIDR prefix length */
	__u8 slot[2];        /* public port slot, big endian */
	__u8 family;
	__u8 addr[16];
};

struct fw_rule {
	__u8 action;         /* ZF_FW_ALLOW / ZF_FW_DENY */
	__u8 pad[3];
	__u32 id;            /* rule index: rule_stats slot */
};

/* Node-wide settings the control plane flips at run time. */
struct zf_config {
	__u32 fw_trie;       /* 0 or 1: which rule trie is live */
	__u32 fw_gen;        /* rule generation flows are checked against */
	/*
	 * The node answers ARP/ND for its VIPs only until this time (bpf_ktime_get_ns);
	 * the daemon renews it with every heartbeat.  A frozen or dead daemon stops
	 * claiming the VIPs by itself, before the peer takes them: no split brain.
	 */
	__u64 active_until_ns;
	__u32 sync;          /* 1: report new flows on flow_events for the standby */
	__u32 nh_gen;        /* next hops cached in flows are valid while this is theirs */
};

/* A VIP the pair moves between its nodes. */
struct vip_key {
	struct zf_addr addr;
	__u8 family;
	__u8 pad[3];
};

struct if_mac {
	__u8 mac[6];
	__u16 pad;
};

/*
 * tx_flags, per egress ifindex.  ZF_TX_KERNEL: an XDP frame redirected there
 * would be dropped by the kernel (a veth whose peer has no NAPI: no XDP program
 * and GRO off, and zfast could not turn GRO on), so the XDP program hands such
 * packets to the kernel's forwarding instead (PASS_EGRESS).
 */
#define ZF_TX_KERNEL 1

/* A new flow, for the standby: its forward entry; the reply entry follows from it. */
struct flow_event {
	struct flow_key key;
	struct flow_value value;
};

/* Rate limit state of one source (a v4 /32 or a v6 /64) on one port: GCRA. */
struct rate_key {
	__u16 slot;
	__u8 family;
	__u8 pad;
	__be32 addr[4];
};

#define ZF_PORT_ALLOWED 0    /* port_stats: slot * ZF_PORT_VERDICTS + verdict */
#define ZF_PORT_DENIED 1
#define ZF_PORT_LIMITED 2
#define ZF_PORT_VERDICTS 3

#define ZF_BACKEND_UP 1    /* new flows may be sent here */
#define ZF_BACKEND_DOWN 2  /* unhealthy: its flows are re-balanced */
/* Neither flag: removed from the config, established flows drain. */

struct backend {
	struct zf_addr addr;
	__u8 family;
	__u8 flags;
	__u16 pad;
};

#define ZF_NO_BACKEND 0xffffffff /* ring slot of a service without backends */

struct zf_counter {
	__u64 packets;
	__u64 bytes;
};

/*
 * Every packet ends in exactly one reason; the action it takes is the
 * prefix.  X(name, action, description): the Python side parses these lines.
 */
#define ZF_REASONS(X)                                                          \
	X(FWD_NEW, REDIRECT, "first packet of a flow balanced to a backend")   \
	X(FWD_FLOW, REDIRECT, "packet of a known flow sent to its backend")    \
	X(FWD_REPLY, REDIRECT, "backend reply rewritten to the VIP")           \
	X(FWD_ICMP, REDIRECT, "ICMP error of a balanced flow sent on")         \
	X(FWD_FRAGMENT, REDIRECT, "later fragment sent after its first one")   \
	X(TX_ARP, REDIRECT, "ARP reply for a VIP this active node holds")            \
	X(TX_ND, REDIRECT, "neighbour advertisement for a VIP this node holds")      \
	X(PASS_NOT_IP, PASS, "not IPv4/IPv6: left to the kernel")              \
	X(PASS_NO_SERVICE, PASS, "not for a service: left to the kernel")      \
	X(PASS_FRAGMENT, PASS, "fragment whose first fragment was not seen")   \
	X(PASS_TTL, PASS, "TTL or hop limit expired: the kernel answers ICMP") \
	X(PASS_NO_NEIGH, PASS, "no neighbour entry yet: the kernel resolves it") \
	X(PASS_FIB, PASS, "route is local, unreachable or too small an MTU")   \
	X(PASS_VLAN, PASS, "balanced, then forwarded by the kernel's VLAN device") \
	X(PASS_EGRESS, PASS, "egress port takes no XDP frames: the kernel forwards") \
	X(DROP_MALFORMED, DROP, "truncated or malformed header")               \
	X(DROP_NO_BACKEND, DROP, "service has no healthy backend")             \
	X(DROP_FW_PROJECT, DROP, "source on the project-wide deny list")       \
	X(DROP_FW_DENY, DROP, "source denied by the public port's firewall")   \
	X(DROP_RATE_LIMIT, DROP, "over the port's new-connection rate limit")  \
	X(DROP_UDP6_NO_CSUM, DROP, "IPv6 UDP with a zero checksum")            \
	X(DROP_ERROR, DROP, "internal error (a map refused an update)")

#define ZF_REASON_ENUM(name, action, desc) ZF_##name,
enum zf_reason { ZF_REASONS(ZF_REASON_ENUM) ZF_REASON_MAX };
#undef ZF_REASON_ENUM

#endif /* ZFAST_SHARED_H */
