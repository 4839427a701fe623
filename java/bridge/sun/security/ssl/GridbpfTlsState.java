package sun.security.ssl;

import java.nio.ByteBuffer;

import static sun.security.ssl.GridbpfTlsBridge.*;

/** Per-thread preallocated state: the record buffer, saved positions, the last connection. */
final class GridbpfTlsState {
    final byte[] rec = new byte[HEADER + DATA_MAX];
    /** The recv transport's copy of a record sent alone, in native memory (recv(2) is given
     *  its address). */
    final ByteBuffer direct = ByteBuffer.allocateDirect(HEADER + DATA_MAX);
    final long directAddress = ((sun.nio.ch.DirectBuffer) direct).address();
    // wrap / unwrap in progress
    Object engineOwner;
    ByteBuffer[] bufs;
    int bufOff, bufCount;
    final int[] pos = new int[MAX_BUFFERS];
    // socket read / write in progress
    Object readOwner;
    byte[] readBuf;
    int readOff;
    Object writeOwner;
    byte[] writeBuf;
    int writeOff, writeLen;
    // connection identity cache (one per thread: a connection switch costs one lookup)
    Object conn;
    int connId, flags, port, family;
    final byte[] addr = new byte[16];
}

