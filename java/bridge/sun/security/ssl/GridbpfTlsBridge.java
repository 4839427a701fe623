package sun.security.ssl;

import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.lang.invoke.MethodHandle;
import java.net.InetAddress;
import java.nio.ByteBuffer;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.atomic.LongAdder;
import java.util.concurrent.locks.ReentrantLock;
import javax.net.ssl.SSLEngine;
import javax.net.ssl.SSLEngineResult;
import javax.net.ssl.SSLSocket;

/**
 * The only code that the hooks injected into the JDK's TLS classes call. The agent defines it
 * (with its two helper classes) inside java.base, in this very package, through a private
 * Lookup on sun.security.ssl: the hooked classes link to it as to any class of their own package
 * (no module edge, no bootstrap class path append: that one makes HotSpot print a CDS warning
 * into the service's stderr). Every entry point catches every Throwable: the service never sees
 * an exception from us.
 *
 * Each hook call that moved plaintext becomes one record handed to the kernel with ONE system
 * call, by the transport(s) the tracers' leases ask for:
 *  - write: write(2) on a FileOutputStream (normally /dev/null); the BPF side reads the record at
 *    sys_exit of that write (kernels without the socket tracepoints: the syscall hook).
 *  - recv: recv(2) of the record's own buffer on a non-blocking, unbound UDP socket, which has
 *    nothing to deliver and fails at once with EAGAIN, copying nothing; the BPF side reads the
 *    buffer at the socket layer's sock_recv_length tracepoint (Linux 6.3+). No syscall
 *    tracepoint is needed, so the rest of the box stays off the syscall slow path.
 * Layout: docs/tracing.md and bpf/include/gridbpf/http.h (struct http_jvm_record).
 *
 * Hot path: when no tracer holds a lease, every hook returns after one volatile read. When
 * active, nothing is allocated per record: each thread owns a preallocated GridbpfTlsState.
 */
public final class GridbpfTlsBridge {
    public static final int HEADER = 48;
    public static final int DATA_MAX = 256;
    public static final int HEAD_SCAN_MAX = 4096;
    static final int MAX_BUFFERS = 64;     // positions saved per wrap/unwrap call

    static final int DIR_RECV = 0, DIR_SEND = 1, DIR_CLOSE = 2;
    static final int FLAG_CLIENT = 1, FLAG_SOCKET = 2, FLAG_HELD = 4;

    /** True while some tracer holds a fresh lease (set by the agent's lease thread). */
    public static volatile boolean active;
    /** Set once the agent transformed the JDK classes: a second attach must not redo it. */
    public static volatile boolean installed;

    static volatile FileOutputStream out;
    static volatile String outPath;
    /** Which transports the fresh leases ask for (set by the agent's lease thread). */
    public static volatile boolean viaWrite = true, viaRecv;
    /** The recv transport: the socket's descriptor, and sun.nio.ch's read0(fd, address, len). */
    static volatile FileDescriptor recvFd;
    static volatile MethodHandle read0;
    public static final LongAdder recvUnexpected = new LongAdder();
    /** Striped: every record counts here, from threads on every CPU (an AtomicLong's line would bounce). */
    public static final LongAdder records = new LongAdder();
    /** The calls that carried them (one per batch, or per record sent alone). */
    public static final LongAdder calls = new LongAdder();
    public static final AtomicLong errors = new AtomicLong();
    public static volatile String lastError = "";

    private GridbpfTlsBridge() {}

    private static final GridbpfTlsLocal STATE = new GridbpfTlsLocal();

    /**
     * Batched records: once a server engine's record has gone alone (the kernel side then knows
     * the engine's connection), its later records wait in the batch being filled, with every
     * other known engine's, and reach the kernel BATCH_MAX (or batchMax) at a time in one system
     * call, or from the agent's lease thread after HOLD_MAX_NS, or when an engine closes. Under
     * load that is one system call (and one run of the tracer's program) per several requests
     * instead of one per request, the agent's and the tracer's largest costs on a busy server.
     * Every record of a known engine passes the APPEND lock, so the records reach the kernel in
     * the order of the calls whatever threads make them (Jetty unwraps and wraps on different
     * ones): a full batch is handed over to FLUSH before APPEND is let go, and FLUSH is taken
     * by one batch after the other. A waiting record says its age, so it is dated to its call.
     * A new set of tracers (holdEpoch) makes every engine send alone again. (The locks allocate
     * only when contended; nothing else is allocated per record.)
     */
    static final int BATCH_MAX = 16;
    static final int SLOT_COUNT = 1024;
    static final long HOLD_MAX_NS = 100_000_000L;
    /** Records a batch takes before it goes (at most BATCH_MAX; set from the leases). */
    public static volatile int batchMax = BATCH_MAX;
    private static final ReentrantLock APPEND = new ReentrantLock();
    private static final ReentrantLock FLUSH = new ReentrantLock();
    /** Guarded by APPEND: the batch taking records, and the other one (free while FLUSH is free). */
    private static GridbpfTlsBatch filling = new GridbpfTlsBatch(), spare = new GridbpfTlsBatch();
    /** Guarded by APPEND: by identity hash, the engine known to the tracers of holdEpoch slotEpoch. */
    private static final int[] slotEngine = new int[SLOT_COUNT], slotEpoch = new int[SLOT_COUNT];
    /** Bumped by the agent when the set of leases changes: engines are known to no new tracer. */
    public static volatile int holdEpoch;

    /** Opens the record sink once; later calls keep the first one. Returns the path in use. */
    public static synchronized String open(String path) throws java.io.IOException {
        if (out == null) {
            out = new FileOutputStream(path, true);
            outPath = path;
        }
        return outPath;
    }

    public static FileOutputStream sink() { return out; }

    /**
     * Sets up the recv transport once: fd is a non-blocking socket that never has data (the
     * agent keeps its channel reachable), read0 is (FileDescriptor, long, int) -> int.
     */
    public static synchronized void openRecv(FileDescriptor fd, MethodHandle read) {
        if (recvFd == null) {
            read0 = read;
            recvFd = fd;
        }
    }

    static void fail(Throwable t) {
        errors.incrementAndGet();
        try { lastError = String.valueOf(t); } catch (Throwable ignored) { }
    }

    // ---------------------------------------------------------------- SSLEngineImpl hooks

    /** Entry of SSLEngineImpl.wrap(ByteBuffer[],int,int,ByteBuffer[],int,int): the sources. */
    public static void wrapEnter(Object engine, ByteBuffer[] srcs, int off, int len) {
        if (!active) return;
        try { saveBuffers(STATE.get(), engine, srcs, off, len); } catch (Throwable t) { fail(t); }
    }

    public static void wrapExit(SSLEngineResult result, Object engine) {
        if (!active) return;
        try {
            GridbpfTlsState s = STATE.get();
            if (s.engineOwner != engine || engine == null) return;
            s.engineOwner = null;
            if (result != null) emitBuffers(s, (SSLEngine) engine, result.bytesConsumed(), DIR_SEND);
            s.bufs = null;
        } catch (Throwable t) { fail(t); }
    }

    /** Entry of SSLEngineImpl.unwrap(ByteBuffer[],int,int,ByteBuffer[],int,int): the destinations. */
    public static void unwrapEnter(Object engine, ByteBuffer[] dsts, int off, int len) {
        if (!active) return;
        try { saveBuffers(STATE.get(), engine, dsts, off, len); } catch (Throwable t) { fail(t); }
    }

    public static void unwrapExit(SSLEngineResult result, Object engine) {
        if (!active) return;
        try {
            GridbpfTlsState s = STATE.get();
            if (s.engineOwner != engine || engine == null) return;
            s.engineOwner = null;
            if (result != null) emitBuffers(s, (SSLEngine) engine, result.bytesProduced(), DIR_RECV);
            s.bufs = null;
        } catch (Throwable t) { fail(t); }
    }

    /** Entry of SSLEngineImpl.closeOutbound(): a close record for client engines; for a server
     *  engine, the batch goes (its records before its socket's close). */
    public static void engineClose(Object engine) {
        if (!active) return;
        try {
            GridbpfTlsState s = STATE.get();
            identifyEngine(s, (SSLEngine) engine);
            if ((s.flags & FLAG_CLIENT) != 0) {
                emit(s, 0, 0, 0, DIR_CLOSE);
                return;
            }
            // its waiting records go before its socket closes; the slot may serve another engine
            APPEND.lock();
            int slot = s.connId & (SLOT_COUNT - 1);
            if (slotEngine[slot] == s.connId) slotEngine[slot] = 0;
            flush(false);
        } catch (Throwable t) { fail(t); }
    }

    /** From the agent's lease thread, 5 times a second: the batch goes if its first record is
     *  older than HOLD_MAX_NS (ALL: whatever it holds, at the JVM's shutdown). */
    public static void flushHeld(boolean all) {
        try {
            GridbpfTlsBatch b = filling;          // read unlocked: checked again locked
            if (b.count == 0 || !all && System.nanoTime() - b.madeAt[0] < HOLD_MAX_NS) return;
            APPEND.lock();
            b = filling;
            if (b.count == 0 || !all && System.nanoTime() - b.madeAt[0] < HOLD_MAX_NS) {
                APPEND.unlock();
                return;
            }
            flush(false);
        } catch (Throwable t) { fail(t); }
    }

    private static void saveBuffers(GridbpfTlsState s, Object engine, ByteBuffer[] bufs, int off, int len) {
        int n = Math.min(Math.max(len, 0), MAX_BUFFERS);
        for (int i = 0; i < n; i++) {
            ByteBuffer b = bufs[off + i];
            s.pos[i] = b == null ? 0 : b.position();
        }
        s.bufs = bufs;
        s.bufOff = off;
        s.bufCount = n;
        s.engineOwner = engine;
    }

    /** Copies the first bytes moved by this call: from each buffer's saved position to its new one. */
    private static void emitBuffers(GridbpfTlsState s, SSLEngine engine, int total, int dir) {
        if (total <= 0) return;
        identifyEngine(s, engine);
        byte[] rec = s.rec;
        int copied = 0, seen = 0;
        for (int i = 0; i < s.bufCount && seen < total && copied < DATA_MAX; i++) {
            ByteBuffer b = s.bufs[s.bufOff + i];
            if (b == null) continue;
            int start = s.pos[i];
            int moved = Math.min(b.position() - start, total - seen);
            if (moved <= 0) continue;
            int k = Math.min(moved, DATA_MAX - copied);
            b.get(start, rec, HEADER + copied, k);
            copied += k;
            seen += moved;
        }
        int headLen = 0;
        if (dir == DIR_SEND && startsWithHttp(rec, copied)) {
            // a small response's head is within the copy: scan that array, not the buffers
            headLen = headEndIn(rec, HEADER, copied);
            if (headLen == 0 && total > copied) headLen = headEndInBuffers(s, total);
        }
        emit(s, total, copied, headLen, dir);
    }

    /** Offset (from off) just past the first CRLFCRLF in b[off, off+len), else 0. */
    private static int headEndIn(byte[] b, int off, int len) {
        int window = 0;
        for (int p = off, end = off + len; p < end; p++) {
            window = (window << 8) | (b[p] & 0xff);
            if (window == 0x0d0a0d0a) return p - off + 1;
        }
        return 0;
    }

    /** Offset just past the first CRLFCRLF within the first 4096 plaintext bytes, else 0. */
    private static int headEndInBuffers(GridbpfTlsState s, int total) {
        int limit = Math.min(total, HEAD_SCAN_MAX);
        int window = 0, index = 0;
        for (int i = 0; i < s.bufCount && index < limit; i++) {
            ByteBuffer b = s.bufs[s.bufOff + i];
            if (b == null) continue;
            int start = s.pos[i];
            int end = Math.min(b.position(), start + (limit - index));
            for (int p = start; p < end; p++) {
                window = (window << 8) | (b.get(p) & 0xff);
                index++;
                if (window == 0x0d0a0d0a) return index;
            }
        }
        return 0;
    }

    private static void identifyEngine(GridbpfTlsState s, SSLEngine engine) {
        if (s.conn == engine) return;
        s.connId = System.identityHashCode(engine);
        s.flags = engine.getUseClientMode() ? FLAG_CLIENT : 0;
        int port = engine.getPeerPort();
        s.port = port > 0 ? port : 0;
        s.family = 0;
        java.util.Arrays.fill(s.addr, (byte) 0);
        s.conn = engine;
    }

    // ---------------------------------------------------------------- SSLSocketImpl hooks

    /** Entry of SSLSocketImpl$AppInputStream.read(byte[],int,int). */
    public static void readEnter(Object socket, byte[] b, int off) {
        if (!active) return;
        try {
            GridbpfTlsState s = STATE.get();
            s.readBuf = b;
            s.readOff = off;
            s.readOwner = socket;
        } catch (Throwable t) { fail(t); }
    }

    /** Return of AppInputStream.read: n bytes of plaintext landed at b[off]. */
    public static void readExit(int n) {
        if (!active) return;
        try {
            GridbpfTlsState s = STATE.get();
            Object socket = s.readOwner;
            if (socket == null) return;
            s.readOwner = null;
            if (n > 0) emitArray(s, (SSLSocket) socket, s.readBuf, s.readOff, n, DIR_RECV);
            s.readBuf = null;
        } catch (Throwable t) { fail(t); }
    }

    /** Entry of SSLSocketImpl$AppOutputStream.write(byte[],int,int). */
    public static void writeEnter(Object socket, byte[] b, int off, int len) {
        if (!active) return;
        try {
            GridbpfTlsState s = STATE.get();
            s.writeBuf = b;
            s.writeOff = off;
            s.writeLen = len;
            s.writeOwner = socket;
        } catch (Throwable t) { fail(t); }
    }

    /** Normal return of AppOutputStream.write: the whole slice was sent. */
    public static void writeExit() {
        if (!active) return;
        try {
            GridbpfTlsState s = STATE.get();
            Object socket = s.writeOwner;
            if (socket == null) return;
            s.writeOwner = null;
            if (s.writeLen > 0) emitArray(s, (SSLSocket) socket, s.writeBuf, s.writeOff, s.writeLen, DIR_SEND);
            s.writeBuf = null;
        } catch (Throwable t) { fail(t); }
    }

    /** Entry of SSLSocketImpl.close(): a close record for client sockets. */
    public static void socketClose(Object socket) {
        if (!active) return;
        try {
            GridbpfTlsState s = STATE.get();
            identifySocket(s, (SSLSocket) socket);
            if ((s.flags & FLAG_CLIENT) != 0) emit(s, 0, 0, 0, DIR_CLOSE);
        } catch (Throwable t) { fail(t); }
    }

    private static void emitArray(GridbpfTlsState s, SSLSocket socket, byte[] b, int off, int len, int dir) {
        identifySocket(s, socket);
        int copied = Math.min(len, DATA_MAX);
        System.arraycopy(b, off, s.rec, HEADER, copied);
        int headLen = 0;
        if (dir == DIR_SEND && startsWithHttp(s.rec, copied)) headLen = headEndIn(b, off, Math.min(len, HEAD_SCAN_MAX));
        emit(s, len, copied, headLen, dir);
    }

    private static void identifySocket(GridbpfTlsState s, SSLSocket socket) {
        if (s.conn == socket) return;
        s.connId = System.identityHashCode(socket);
        s.flags = FLAG_SOCKET | (socket.getUseClientMode() ? FLAG_CLIENT : 0);
        s.port = Math.max(socket.getPort(), 0);
        java.util.Arrays.fill(s.addr, (byte) 0);
        s.family = 0;
        InetAddress a = socket.getInetAddress();
        if (a != null) {
            byte[] raw = a.getAddress();     // allocates: once per connection switch on this thread
            System.arraycopy(raw, 0, s.addr, 0, Math.min(raw.length, 16));
            s.family = raw.length == 4 ? 2 : 10;
        }
        s.conn = socket;
    }

    // ---------------------------------------------------------------- the record

    private static boolean startsWithHttp(byte[] rec, int copied) {
        return copied >= 5 && rec[HEADER] == 'H' && rec[HEADER + 1] == 'T' && rec[HEADER + 2] == 'T'
                && rec[HEADER + 3] == 'P' && rec[HEADER + 4] == '/';
    }

    /** Fills the 48-byte header (data already in place) and sends the record (or holds it back). */
    private static void emit(GridbpfTlsState s, int len, int copied, int headLen, int dir) {
        byte[] r = s.rec;
        // magic "\0GRBJVM1"
        r[0] = 0; r[1] = 'G'; r[2] = 'R'; r[3] = 'B'; r[4] = 'J'; r[5] = 'V'; r[6] = 'M'; r[7] = '1';
        putInt(r, 8, s.connId);
        putInt(r, 12, 0);                  // age in microseconds: set if batched
        putInt(r, 16, len);
        putShort(r, 20, copied);
        putShort(r, 22, headLen);
        r[24] = (byte) dir;
        r[25] = (byte) s.flags;
        putShort(r, 26, s.port);
        putShort(r, 28, s.family);
        putShort(r, 30, 0);
        System.arraycopy(s.addr, 0, r, 32, 16);
        int n = HEADER + copied;
        if ((s.flags & (FLAG_CLIENT | FLAG_SOCKET)) == 0 && dir != DIR_CLOSE) emitEngine(s, r, n);
        else transmit(s.direct, s.directAddress, r, n, 1);     // a client's or socket's: alone
    }

    /** A server engine's record: into the batch, which goes now if the engine is new to the
     *  tracers (its record then binds it, from this thread, right after its socket read) or full. */
    private static void emitEngine(GridbpfTlsState s, byte[] r, int n) {
        int slot = s.connId & (SLOT_COUNT - 1), epoch = holdEpoch;
        APPEND.lock();
        boolean flushed = false;
        try {
            GridbpfTlsBatch b = filling;          // room for a record: a batch goes before it has none
            b.add(r, n, System.nanoTime());
            boolean known = slotEngine[slot] == s.connId && slotEpoch[slot] == epoch;
            if (known && b.count < Math.min(batchMax, BATCH_MAX) && b.fits(HEADER + DATA_MAX)) return;
            slotEngine[slot] = s.connId;          // known to the tracers once this call is made
            slotEpoch[slot] = epoch;
            flushed = true;
            flush(true);
        } finally {
            if (!flushed) APPEND.unlock();
        }
    }

    /**
     * Sends the filling batch (if it holds records) and lets APPEND go: the batch passes to
     * FLUSH first, so batches reach the kernel in turn while others fill the spare. OWN: its
     * last record is this thread's own call, not held (it may bind its engine). Callers hold
     * APPEND; it is let go whatever happens.
     */
    private static void flush(boolean own) {
        GridbpfTlsBatch b = null;
        try {
            if (filling.count > 0) {
                FLUSH.lock();                     // the batch before has reached the kernel
                b = filling;
                filling = spare;
                spare = b;
            }
        } finally {
            APPEND.unlock();
        }
        if (b == null) return;
        try {
            if (own) b.bytes[b.at[b.count - 1] + 25] &= ~FLAG_HELD;
            b.date(System.nanoTime());
            transmit(b.direct, b.directAddress, b.bytes, b.used, b.count);
        } finally {
            b.clear();
            FLUSH.unlock();
        }
    }

    /** One system call with the N bytes of R (COUNT records), by the transports the leases
     *  ask for; DIRECT at ADDRESS is the native copy recv(2) is given. */
    private static void transmit(ByteBuffer direct, long address, byte[] r, int n, int count) {
        FileOutputStream o = out;
        try {
            if (viaRecv) recv(direct, address, r, n);
            if (viaWrite && o != null) o.write(r, 0, n);
            records.add(count);
            calls.increment();
        } catch (Throwable t) { fail(t); }
    }

    /** The records copied to DIRECT (at ADDRESS) and offered as recv(2)'s destination. */
    private static void recv(ByteBuffer direct, long address, byte[] r, int n) throws Throwable {
        FileDescriptor fd = recvFd;
        MethodHandle read = read0;
        if (fd == null || read == null) return;
        direct.put(0, r, 0, n);
        // EAGAIN comes back as IOStatus.UNAVAILABLE (-2), no exception: nothing was read
        int got = (int) read.invokeExact(fd, address, n);
        if (got != -2) recvUnexpected.increment();
    }

    private static void putInt(byte[] r, int at, int v) {
        r[at] = (byte) v; r[at + 1] = (byte) (v >>> 8); r[at + 2] = (byte) (v >>> 16); r[at + 3] = (byte) (v >>> 24);
    }

    private static void putShort(byte[] r, int at, int v) {
        r[at] = (byte) v; r[at + 1] = (byte) (v >>> 8);
    }
}
