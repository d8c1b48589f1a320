/* SPDX-License-Identifier: GPL-2.0 */
/*
 * csum.h: incremental Internet checksum updates (RFC 1624, eqn. 3).
 * Words are summed as they lie in memory: the one's complement sum does not
 * care about byte order as long as every term is read the same way.
 */
#ifndef ZFAST_CSUM_H
#define ZFAST_CSUM_H

static __always_inline __u32 zf_csum_add(__u32 a, __u32 b)
{
	a += b;
	return a + (a < b);
}

static __always_inline __u16 zf_csum_fold(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

/* Accumulate the change of one 32-bit word into diff: ~old + new. */
static __always_inline __u32 zf_csum_diff32(__u32 diff, __u32 old, __u32 new)
{
	return zf_csum_add(zf_csum_add(diff, ~old), new);
}

static __always_inline __u32 zf_csum_diff16(__u32 diff, __u16 old, __u16 new)
{
	return zf_csum_add(zf_csum_add(diff, (__u16)~old), new);
}

/* HC' = ~(~HC + diff) */
static __always_inline __u16 zf_csum_apply(__u16 check, __u32 diff)
{
	return ~zf_csum_fold(zf_csum_add((__u16)~check, diff));
}

#endif /* ZFAST_CSUM_H */
