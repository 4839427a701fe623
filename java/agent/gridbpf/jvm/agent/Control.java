package gridbpf.jvm.agent;

import java.io.File;
import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.InputStream;
import java.lang.invoke.MethodHandle;
import java.lang.invoke.MethodHandles;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.lang.reflect.Field;
import java.lang.reflect.Method;
import java.lang.reflect.Modifier;
import java.nio.ByteBuffer;
import javax.net.ssl.SSLEngineResult;

/**
 * The agent's side of the bridge: defines the bridge classes inside java.base's sun.security.ssl
 * package, checks them, and reads/sets their state by reflection (the package is opened to this
 * agent only). Every getter turns a missing bridge into a harmless default.
 */
final class Control {
    static final String PACKAGE = "sun.security.ssl";
    static final String BRIDGE = PACKAGE + ".GridbpfTlsBridge";
    /** Defined in this order; the jar holds them under gridbpf-bridge/ (not loadable from there). */
    static final String[] CLASSES = {"GridbpfTlsState", "GridbpfTlsLocal", "GridbpfTlsBatch", "GridbpfTlsBridge"};
    static final long LEASE_FRESH_MS = 5000;

    private static volatile Class<?> bridge;

    private Control() {}

    /** The bridge if an earlier load of the agent already defined it, else null. */
    static Class<?> findBridge() {
        try {
            return Class.forName(BRIDGE, false, null);
        } catch (Throwable t) {
            return null;
        }
    }

    /** Defines the bridge classes in java.base (the package must be opened to us) and initialises them. */
    static Class<?> defineBridge() throws Exception {
        Class<?> anchor = Class.forName(PACKAGE + ".SSLEngineImpl", false, null);
        MethodHandles.Lookup lookup = MethodHandles.privateLookupIn(anchor, MethodHandles.lookup());
        for (String name : CLASSES) {
            byte[] bytes;
            try (InputStream in = Control.class.getResourceAsStream("/gridbpf-bridge/" + name + ".class")) {
                if (in == null) throw new IllegalStateException("bridge class missing from the agent jar: " + name);
                bytes = in.readAllBytes();
            }
            lookup.defineClass(bytes);
        }
        Class<?> b = Class.forName(BRIDGE, true, null);   // linked and initialised before any hook exists
        checkBridgeMethods(b);
        bridge = b;
        return b;
    }

    static void useBridge(Class<?> b) { bridge = b; }

    /** Fails unless the bridge has every entry point the injected code calls, with these exact types. */
    static void checkBridgeMethods(Class<?> b) throws Exception {
        Class<?>[][] sigs = {
            {Object.class, ByteBuffer[].class, int.class, int.class},
            {SSLEngineResult.class, Object.class},
            {Object.class},
            {Object.class, byte[].class, int.class},
            {int.class},
            {Object.class, byte[].class, int.class, int.class},
            {},
        };
        String[][] names = {
            {"wrapEnter", "unwrapEnter"}, {"wrapExit", "unwrapExit"}, {"engineClose", "socketClose"},
            {"readEnter"}, {"readExit"}, {"writeEnter"}, {"writeExit"},
        };
        for (int i = 0; i < sigs.length; i++) {
            for (String name : names[i]) {
                Method m = b.getMethod(name, sigs[i]);
                if (!Modifier.isStatic(m.getModifiers()) || m.getReturnType() != void.class)
                    throw new IllegalStateException("bridge method has the wrong shape: " + name);
            }
        }
    }

    static String openSink(String path) throws Exception {
        return (String) bridge.getMethod("open", String.class).invoke(null, path);
    }

    /** The recv transport: hands the bridge the socket's descriptor and sun.nio.ch's read0. */
    static void openRecv(FileDescriptor fd, MethodHandle read0) throws Exception {
        bridge.getMethod("openRecv", FileDescriptor.class, MethodHandle.class).invoke(null, fd, read0);
    }

    static FileDescriptor sinkDescriptor() throws Exception {
        return ((FileOutputStream) bridge.getMethod("sink").invoke(null)).getFD();
    }

    private static Object get(String field) throws Exception {
        Field f = bridge.getField(field);
        return f.get(null);
    }

    private static void setBoolean(String field, boolean value) throws Exception {
        bridge.getField(field).setBoolean(null, value);
    }

    static void markInstalled() throws Exception { setBoolean("installed", true); }

    /**
     * active = some lease-* file in dir modified within the last 5 s; sets the bridge's flags.
     * A lease holds the transport its tracer reads ("recv" or "write"; empty: write), then
     * optionally "batch=N" (records a batch takes at most): records go by every transport a
     * fresh lease asks for.
     */
    static boolean refreshLease(String dir) {
        boolean active = false, write = false, recv = false;
        int batch = Integer.MAX_VALUE;
        File[] files = dir == null ? null : new File(dir).listFiles();
        java.util.TreeSet<String> fresh = new java.util.TreeSet<>();
        if (files != null) {
            long now = System.currentTimeMillis();
            for (File f : files) {
                if (f.getName().startsWith("lease-") && now - f.lastModified() < LEASE_FRESH_MS) {
                    active = true;
                    fresh.add(f.getName());
                    String[] want = leaseWants(f).split("\\s+");
                    if (want[0].equals("recv")) recv = true;
                    else write = true;
                    for (String w : want) {
                        if (w.startsWith("batch=")) {
                            try { batch = Math.min(batch, Integer.parseInt(w.substring(6))); } catch (NumberFormatException ignored) { }
                        }
                    }
                }
            }
        }
        try {
            if (bridge == null) return false;
            active = active && installed();
            if (active) {
                trySetBoolean("viaWrite", write);
                trySetBoolean("viaRecv", recv);
                // records a batch takes: the fewest any lease asks for (default 16, 1: each alone)
                trySetInt("batchMax", batch == Integer.MAX_VALUE ? DEFAULT_BATCH : Math.max(batch, 1));
            }
            if (!fresh.equals(lastLeases)) {
                // a tracer came or went: engines send alone again, so that a new one binds them
                lastLeases = fresh;
                try {
                    Field e = bridge.getField("holdEpoch");
                    e.setInt(null, e.getInt(null) + 1);
                } catch (NoSuchFieldException older) { /* an older bridge holds nothing back */ }
            }
            setBoolean("active", active);
            flushHeld(false);
            return active;
        } catch (Throwable t) {
            return false;
        }
    }

    private static java.util.Set<String> lastLeases = java.util.Collections.emptySet();
    private static Method flushHeld;

    /** Batched records (held-back ones, in an older bridge) older than HOLD_MAX_NS go now, or
     *  ALL of them (the oldest bridges hold none back). */
    static void flushHeld(boolean all) {
        try {
            if (flushHeld == null) flushHeld = bridge.getMethod("flushHeld", boolean.class);
            flushHeld.invoke(null, all);
        } catch (Throwable ignored) { }
    }

    private static String leaseWants(File lease) {
        try {
            return new String(Files.readAllBytes(lease.toPath()), StandardCharsets.US_ASCII).trim();
        } catch (Throwable t) {
            return "";
        }
    }

    // a whole batch (BATCH_MAX): halving the calls of batches of 8 cut the tracer's BPF time per
    // request by 13% (one Tomcat, traced with 8 and 16 alternating); tracers since batches read 16
    static final int DEFAULT_BATCH = 16;

    private static void trySetInt(String field, int value) {
        try { bridge.getField(field).setInt(null, value); } catch (Throwable ignored) { }
    }

    /** A bridge defined by an older agent may lack the field: then it keeps its only transport. */
    private static void trySetBoolean(String field, boolean value) {
        try { setBoolean(field, value); } catch (Throwable ignored) { }
    }

    static boolean flag(String field) {
        try { return bridge != null && (Boolean) get(field); } catch (Throwable t) { return false; }
    }

    static boolean installed() {
        try { return bridge != null && (Boolean) get("installed"); } catch (Throwable t) { return false; }
    }

    static boolean active() {
        try { return bridge != null && (Boolean) get("active"); } catch (Throwable t) { return false; }
    }

    static long records() {
        try { return bridge == null ? 0 : ((Number) get("records")).longValue(); } catch (Throwable t) { return 0; }
    }

    /** System calls that carried records (fewer than records when batched; 0 from an older bridge). */
    static long calls() {
        try { return bridge == null ? 0 : ((Number) get("calls")).longValue(); } catch (Throwable t) { return 0; }
    }

    static long recvUnexpected() {
        try { return bridge == null ? 0 : ((Number) get("recvUnexpected")).longValue(); } catch (Throwable t) { return 0; }
    }

    static long errors() {
        try { return bridge == null ? 0 : ((Number) get("errors")).longValue(); } catch (Throwable t) { return 0; }
    }

    static String lastError() {
        try { return bridge == null ? "" : String.valueOf(get("lastError")); } catch (Throwable t) { return ""; }
    }
}
