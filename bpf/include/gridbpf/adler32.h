/*
 * ADLER32 for BPF programs: no helper computes it, so the loop is ours.
 *
 * ADLER32 of bytes x1..xn: a = 1 + sum(x), b = sum over prefixes of a, both mod 65521.
 * Taking 8 bytes per step as one little-endian u64 x0..x7 (x0 first in memory):
 *   b += 8*a + (8*x0 + 7*x1 + ... + 1*x7)      a += x0 + ... + x7
 * The even bytes (x0,x2,x4,x6) and odd bytes (x1,x3,x5,x7) are split into four 16-bit lanes;
 * multiplying the lanes by a packed constant puts the dot product in the top lane (no lane can
 * carry into the next: every partial sum stays below 2^16). The modulo is deferred much further
 * than zlib's NMAX (5552 bytes, the bound for 32-bit sums): with 64-bit sums, after n bytes
 * a < 65521 + 255 n and b < 65521 + n a, so a 16 KiB chunk keeps b below 2^37 (and even 1 MiB
 * would stay below 2^49); the caller reduces once per chunk.
 */
#ifndef GRIDBPF_ADLER32_H
#define GRIDBPF_ADLER32_H

#define GB_ADLER_BASE 65521U
#define GB_ADLER_BLOCK 512U               /* bytes per step of the inner loop (fixed count) */
#define GB_ADLER_BLOCK_WORDS (GB_ADLER_BLOCK / 8)

#define GB_LANES_LO 0x00ff00ff00ff00ffULL
#define GB_ONES16 0x0001000100010001ULL    /* top lane = sum of the four lanes */
#define GB_W_EVEN 0x0008000600040002ULL    /* top lane = 8*x0 + 6*x2 + 4*x4 + 2*x6 */
#define GB_W_ODD 0x0007000500030001ULL     /* top lane = 7*x1 + 5*x3 + 3*x5 + 1*x7 */

/* Running sums, reduced modulo 65521 only now and then (64 bits leave plenty of room). */
struct gb_adler {
	__u64 a;
	__u64 b;
};

/*
 * Add the GB_ADLER_BLOCK bytes at W to S. A fixed trip count keeps the verifier's work to one
 * pass over the unrolled body. Without reduction, S stays exact for many blocks: a grows by at
 * most 255 per byte, b by a per byte; reduce at least every few MiB (gb_adler_reduce).
 */
static __always_inline void gb_adler_block(struct gb_adler *s, const __u64 *w64)
{
	__u64 a = s->a, b = s->b, weighted = 0, w, e, o;

#pragma unroll 4
	for (int i = 0; i < GB_ADLER_BLOCK_WORDS; i++) {
		w = w64[i];
		e = w & GB_LANES_LO;
		o = (w >> 8) & GB_LANES_LO;
		b += a << 3;
		weighted += (e * GB_W_EVEN + o * GB_W_ODD) >> 48;
		a += ((e + o) * GB_ONES16) >> 48;
	}
	s->a = a;
	s->b = b + weighted;
}

/*
 * The last block was padded with PAD zero bytes: each added the final a to b once, nothing to a.
 * Call before reducing, while S holds exact sums.
 */
static __always_inline void gb_adler_unpad(struct gb_adler *s, __u64 pad)
{
	s->b -= pad * s->a;
}

static __always_inline void gb_adler_reduce(struct gb_adler *s)
{
	s->a %= GB_ADLER_BASE;
	s->b %= GB_ADLER_BASE;
}

/* ADLER32 of A followed by B, where B is LEN2 bytes long (zlib's adler32_combine). */
static __always_inline __u32 gb_adler_combine(__u32 adler1, __u32 adler2, __u64 len2)
{
	__u64 a1 = adler1 & 0xffff, b1 = adler1 >> 16;
	__u64 a2 = adler2 & 0xffff, b2 = adler2 >> 16;
	__u64 a = (a1 + a2 + GB_ADLER_BASE - 1) % GB_ADLER_BASE;
	__u64 b = (b1 + b2 + (len2 % GB_ADLER_BASE) * ((a1 + GB_ADLER_BASE - 1) % GB_ADLER_BASE)) %
		  GB_ADLER_BASE;
	return (__u32)(b << 16 | a);
}

#endif
