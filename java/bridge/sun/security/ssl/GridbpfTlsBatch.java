package sun.security.ssl;

import java.nio.ByteBuffer;

import static sun.security.ssl.GridbpfTlsBridge.*;

/**
 * Server engines' records waiting to reach the kernel together, in the order they were made
 * (see GridbpfTlsBridge.emitEngine). The bytes are the records as they go, back to back; the
 * direct copy is what recv(2) is given.
 */
final class GridbpfTlsBatch {
    static final int CAPACITY = BATCH_MAX * (HEADER + DATA_MAX);
    final byte[] bytes = new byte[CAPACITY];
    final ByteBuffer direct = ByteBuffer.allocateDirect(CAPACITY);
    final long directAddress = ((sun.nio.ch.DirectBuffer) direct).address();
    /** Where each record starts, and when it was made (System.nanoTime). */
    final int[] at = new int[BATCH_MAX];
    final long[] madeAt = new long[BATCH_MAX];
    int count, used;

    boolean fits(int n) { return count < BATCH_MAX && used + n <= CAPACITY; }

    void add(byte[] r, int n, long now) {
        System.arraycopy(r, 0, bytes, used, n);
        bytes[used + 25] |= FLAG_HELD;
        at[count] = used;
        madeAt[count] = now;
        count++;
        used += n;
    }

    /** Every record's age (microseconds since it was made) into its header. */
    void date(long now) {
        for (int i = 0; i < count; i++) {
            long us = Math.min((now - madeAt[i]) / 1000, Integer.MAX_VALUE);
            int p = at[i] + 12;
            bytes[p] = (byte) us; bytes[p + 1] = (byte) (us >>> 8);
            bytes[p + 2] = (byte) (us >>> 16); bytes[p + 3] = (byte) (us >>> 24);
        }
    }

    void clear() { count = 0; used = 0; }
}
