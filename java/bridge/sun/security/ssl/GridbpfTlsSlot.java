package sun.security.ssl;

import static sun.security.ssl.GridbpfTlsBridge.*;

/**
 * The record a server engine holds back (see GridbpfTlsBridge.emitEngine). Its monitor orders
 * the records of the engine that owns it, whatever threads make them.
 */
final class GridbpfTlsSlot {
    /** Identity hash of the engine whose records pass here (0: none yet), known to the
     *  tracers of holdEpoch EPOCH. */
    int engine, epoch;
    /** rec holds a record of that engine not sent yet, heldLen bytes, made at heldAt (nanoTime). */
    boolean held;
    int heldLen;
    long heldAt;
    final byte[] rec = new byte[HEADER + DATA_MAX];
}
