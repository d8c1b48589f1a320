/* SPDX-License-Identifier: GPL-2.0 */
/*
 * flows.h: the flow table and the choice of a backend for a new flow.
 *
 * A balanced connection has two entries: the forward one (client -> VIP,
 * rewrite the destination to the backend) and the reply one (backend ->
 * client, rewrite the source back to the VIP).  A new flow picks its backend
 * from the service's Maglev ring by a hash of its 5-tuple; the hash and the
 * ring are the same on every node, so a standby that has not yet received a
 * flow still picks the same backend for it.
 */
#ifndef ZFAST_FLOWS_H
#define ZFAST_FLOWS_H

#include "maps.h"
#include "parse.h"

/* murmur3's mixing steps: cheap, and good enough to spread 5-tuples. */
static __always_inline __u32 zf_mix(__u32 h, __u32 v)
{
	v *= ZF_MURMUR_C1;
	v = (v << 15) | (v >> 17);
	v *= ZF_MURMUR_C2;
	h ^= v;
	h = (h << 13) | (h >> 19);
	return h * 5 + ZF_MURMUR_N;
}

static __always_inline __u32 zf_flow_hash(const struct flow_key *k)
{
	__u32 h = ZF_HASH_SEED;
	int i;

#pragma unroll
	for (i = 0; i < 4; i++) {
		h = zf_mix(h, k->src.w[i]);
		h = zf_mix(h, k->dst.w[i]);
	}
	h = zf_mix(h, ((__u32)k->sport << 16) | k->dport);
	h = zf_mix(h, k->proto);
	h ^= h >> 16;
	h *= ZF_MURMUR_F1;
	h ^= h >> 13;
	h *= ZF_MURMUR_F2;
	h ^= h >> 16;
	return h;
}

/*
 * Pick a backend for a new flow of service svc and install both directions.
 * The reply entry goes in first, so that it exists before the backend can
 * answer.
 */
static __always_inline int zf_flow_new(struct zf_pkt *p, struct service_value *svc, __u32 fw_gen,
				       struct flow_value *fwd)
{
	struct flow_key rkey = {};
	struct flow_value rval = {};
	struct backend *be;
	__u32 ring = svc->ring, slot, bi, *idx;
	void *table;

	table = rings.lookup(&ring);
	if (!table)
		return ZF_DROP_NO_BACKEND;
	slot = zf_flow_hash(&p->key) % ZF_RING_SIZE;
	idx = bpf_map_lookup_elem(table, &slot);
	if (!idx || *idx == ZF_NO_BACKEND)
		return ZF_DROP_NO_BACKEND;
	bi = *idx;
	be = backends.lookup(&bi);
	if (!be || !(be->flags & ZF_BACKEND_UP))
		return ZF_DROP_NO_BACKEND;

	fwd->addr = be->addr;
	fwd->port = svc->target_port;
	fwd->dir = ZF_DIR_FORWARD;
	fwd->service = svc->index;
	fwd->backend = bi;
	fwd->fw_port = svc->fw_port;
	fwd->fw_gen = fw_gen;

	rkey.src = be->addr;
	rkey.dst = p->key.src;
	rkey.sport = svc->target_port;
	rkey.dport = p->key.sport;
	rkey.proto = p->key.proto;
	rkey.family = p->key.family;
	rval.addr = p->key.dst;
	rval.port = p->key.dport;
	rval.dir = ZF_DIR_REPLY;
	rval.service = svc->index;
	rval.backend = bi;

	if (flows.update(&rkey, &rval) || flows.update(&p->key, fwd))
		return ZF_DROP_ERROR;
	return ZF_CONTINUE;
}

/* A known flow whose backend went down is balanced again; a removed one drains. */
static __always_inline int zf_backend_down(__u32 bi)
{
	struct backend *be = backends.lookup(&bi);

	return be && (be->flags & ZF_BACKEND_DOWN);
}

/* Fragments of one datagram share (source, destination, IP id, protocol). */
static __always_inline void zf_frag_key(struct zf_pkt *p, struct frag_key *fk)
{
	fk->src = p->key.src;
	fk->dst = p->key.dst;
	fk->id = p->frag_id;
	fk->proto = p->key.proto;
	fk->family = p->key.family;
}

/* The first fragment leaves its decision for the fragments that follow. */
static __always_inline void zf_frag_remember(struct zf_pkt *p, struct flow_value *fv)
{
	struct frag_key fk = {};

	zf_frag_key(p, &fk);
	frags.update(&fk, fv);
}

static __always_inline struct flow_value *zf_frag_lookup(struct zf_pkt *p)
{
	struct frag_key fk = {};

	zf_frag_key(p, &fk);
	return frags.lookup(&fk);
}

#endif /* ZFAST_FLOWS_H */
