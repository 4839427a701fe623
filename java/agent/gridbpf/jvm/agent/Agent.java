package gridbpf.jvm.agent;

import java.io.File;
import java.io.FileDescriptor;
import java.io.InputStream;
import java.lang.instrument.ClassFileTransformer;
import java.lang.instrument.Instrumentation;
import java.lang.invoke.MethodHandle;
import java.lang.invoke.MethodHandles;
import java.lang.invoke.MethodType;
import java.lang.reflect.Field;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.StandardCopyOption;
import java.security.ProtectionDomain;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;

/**
 * Loaded through the HotSpot attach mechanism ("load instrument false jar=args"): no JVM flag; or
 * at JVM start with -javaagent:JAR (premain), the way for JDK 21+ (see premain).
 * Args (comma separated): dir=/tmp/.gridbpf-jvm-NSPID (holds the agent jar, agent.json and the
 * tracers' lease files); tests only: sink=/path (append records to this file, not /dev/null),
 * test_fail=bridge|dryrun|retransform (fail the install there: nothing must stay transformed).
 *
 * Order: the bridge classes defined inside java.base (package sun.security.ssl) and initialised,
 * every JDK class rewritten in a dry run; only when all of that worked the transformer is
 * installed and the loaded classes retransformed. Any failure: nothing transformed, the reason in
 * agent.json. Never prints (the JVM's stdout/stderr are the service's logs).
 */
public final class Agent {
    // All guarded by Agent.class (agentmain is synchronized).
    private static String dir;
    private static int attaches;
    private static final List<String> hooks = new ArrayList<>();
    private static final Map<String, String> skipped = new LinkedHashMap<>();
    private static String failure = "";
    private static int bridgeFd = -1;
    /** The recv transport's socket (kept reachable: its cleaner would close the fd) and fd number. */
    private static java.nio.channels.DatagramChannel recvChannel;
    private static int recvFd = -1;
    private static String sinkPath = "/dev/null";
    private static Thread leaseThread;
    /** Tests only: a stage (bridge, dryrun, retransform) where install fails on purpose. */
    private static String testFail = "";

    private Agent() {}

    public static synchronized void agentmain(String args, Instrumentation inst) {
        start(parseArgs(args), inst);
    }

    /**
     * Loaded at JVM start (-javaagent:JAR): what a site uses on JDK 21+, which prints a warning
     * for every agent loaded into a running JVM (JEP 451) and will refuse them by default in a
     * later release. Same agent, inactive until a tracer takes a lease; its directory is
     * /tmp/.gridbpf-jvm-PID (the pid as this JVM sees it), made here, 0700, or refused if
     * someone else made it.
     */
    public static synchronized void premain(String args, Instrumentation inst) {
        try {
            Map<String, String> opts = parseArgs(args);
            if (!opts.containsKey("dir")) {
                String d = "/tmp/.gridbpf-jvm-" + ProcessHandle.current().pid();
                if (!ownDirectory(d)) return;     // nowhere safe to report: do nothing at all
                opts.put("dir", d);
            }
            start(opts, inst);
        } catch (Throwable ignored) {
            // never stop the service from starting
        }
    }

    /** Creates dir 0700, or accepts an existing one only if it is ours, a directory and 0700. */
    static boolean ownDirectory(String d) {
        try {
            java.nio.file.Path path = java.nio.file.Path.of(d);
            try {
                Files.createDirectory(path, java.nio.file.attribute.PosixFilePermissions.asFileAttribute(
                        java.nio.file.attribute.PosixFilePermissions.fromString("rwx------")));
            } catch (java.nio.file.FileAlreadyExistsException e) {
                // checked below
            }
            Object owner = Files.getAttribute(path, "unix:uid", java.nio.file.LinkOption.NOFOLLOW_LINKS);
            Object me = Files.getAttribute(java.nio.file.Path.of("/proc/self"), "unix:uid");
            int mode = (Integer) Files.getAttribute(path, "unix:mode", java.nio.file.LinkOption.NOFOLLOW_LINKS);
            return Files.isDirectory(path, java.nio.file.LinkOption.NOFOLLOW_LINKS) && owner.equals(me)
                    && (mode & 0777) == 0700;
        } catch (Throwable t) {
            return false;
        }
    }

    private static void start(Map<String, String> opts, Instrumentation inst) {
        try {
            attaches++;
            if (opts.containsKey("dir")) dir = opts.get("dir");
            if (dir == null) return;            // nowhere to report: do nothing at all
            if (attaches == 1) {
                Class<?> earlier = Control.findBridge();
                if (earlier != null) {
                    // defined by an earlier load of this agent through another class loader
                    Control.useBridge(earlier);
                    failure = "bridge already defined by an earlier agent load: hooks left as they are";
                } else {
                    if (opts.containsKey("sink")) sinkPath = opts.get("sink");
                    testFail = opts.getOrDefault("test_fail", "");
                    try {
                        install(inst);
                    } catch (Throwable t) {
                        failure = oneLine(t);
                        hooks.clear();
                        for (Hooks.Hook h : Hooks.TABLE) skipped.put(h.label(), "not installed: " + failure);
                    }
                }
            }
            Control.refreshLease(dir);
            startLeaseThread();
            writeInfo();
        } catch (Throwable t) {
            failure = oneLine(t);
            try { writeInfo(); } catch (Throwable ignored) { }
        }
    }

    private static void install(Instrumentation inst) throws Exception {
        if (!inst.isRetransformClassesSupported()) throw new IllegalStateException("retransformation not supported");
        // 1. java.base opens sun.security.ssl (to define the bridge there) and java.io (the fd
        //    number) to this agent only, and exports the JDK's ASM to it
        Module javaBase = Object.class.getModule();
        Module self = Agent.class.getModule();
        inst.redefineModule(javaBase, Set.of(),
                Map.of("jdk.internal.org.objectweb.asm", Set.of(self)),
                Map.of(Control.PACKAGE, Set.of(self), "java.io", Set.of(self), "sun.nio.ch", Set.of(self)),
                Set.of(), Map.of());

        // 2. the bridge defined, linked and initialised, its entry points checked
        Control.defineBridge();
        injectFailure("bridge");

        // 3. the record sink and its fd number (what the BPF side watches)
        sinkPath = Control.openSink(sinkPath);
        bridgeFd = fdOf(Control.sinkDescriptor());
        openRecvTransport();

        // 4. dry run on every target class's bytes: all hooks must apply, else nothing changes
        List<String> targets = Hooks.targetClasses();
        for (String name : targets) {
            byte[] bytes;
            try (InputStream in = javaBase.getResourceAsStream(name + ".class")) {
                if (in == null) throw new IllegalStateException("class file not found: " + name);
                bytes = in.readAllBytes();
            }
            Hooks.rewrite(name, bytes);
        }
        injectFailure("dryrun");

        // 5. install: new loads are rewritten by the transformer, loaded classes retransformed
        Transformer transformer = new Transformer(targets);
        inst.addTransformer(transformer, true);
        List<Class<?>> loaded = new ArrayList<>();
        for (Class<?> c : inst.getAllLoadedClasses()) {
            if (c.getClassLoader() == null && targets.contains(c.getName().replace('.', '/'))) loaded.add(c);
        }
        try {
            if (!loaded.isEmpty()) inst.retransformClasses(loaded.toArray(new Class<?>[0]));
        } catch (Throwable t) {
            inst.removeTransformer(transformer);   // JVMTI installs none of the classes on failure
            throw t;
        }
        if (testFail.equals("retransform")) transformer.failure = "test failure injected at retransform";
        if (transformer.failure != null) {
            inst.removeTransformer(transformer);
            if (!loaded.isEmpty()) inst.retransformClasses(loaded.toArray(new Class<?>[0]));
            throw new IllegalStateException(transformer.failure);
        }
        for (Hooks.Hook h : Hooks.TABLE) {
            if (h.kind != Hooks.Kind.NOT_IMPLEMENTED) hooks.add(h.label());
        }
        skipped.putAll(Hooks.notImplemented());
        Control.markInstalled();
    }

    /**
     * The recv transport: an unbound, non-blocking UDP socket (nothing can ever arrive on it, so
     * every recv fails with EAGAIN and copies nothing) and the JDK's own read0 native for
     * datagram sockets, which receives into an address and reports EAGAIN as a status, not an
     * exception. If any part is
     * missing the write transport still works: the reason goes to agent.json.
     */
    private static void openRecvTransport() {
        try {
            java.nio.channels.DatagramChannel ch = java.nio.channels.DatagramChannel.open();
            ch.configureBlocking(false);
            FileDescriptor fd = (FileDescriptor) Class.forName("sun.nio.ch.SelChImpl")
                    .getMethod("getFD").invoke(ch);
            // recv(2) (the datagram dispatcher's read0) skips the VFS layer that read(2) goes through
            Class<?> dispatcher = Class.forName("sun.nio.ch.DatagramDispatcher");
            MethodHandle read0 = MethodHandles.privateLookupIn(dispatcher, MethodHandles.lookup())
                    .findStatic(dispatcher, "read0", MethodType.methodType(int.class, FileDescriptor.class, long.class, int.class));
            Control.openRecv(fd, read0);
            recvChannel = ch;
            recvFd = fdOf(fd);
        } catch (Throwable t) {
            skipped.put("transport recv", "not available: " + oneLine(t));
        }
    }

    private static void injectFailure(String stage) {
        if (testFail.equals(stage)) throw new IllegalStateException("test failure injected at " + stage);
    }

    private static int fdOf(FileDescriptor fd) {
        try {
            Field f = FileDescriptor.class.getDeclaredField("fd");
            f.setAccessible(true);
            return f.getInt(fd);
        } catch (Throwable t) {
            return -1;
        }
    }

    /** Rewrites the target classes when they load (or are retransformed); leaves every other class alone. */
    static final class Transformer implements ClassFileTransformer {
        final List<String> targets;
        volatile String failure;

        Transformer(List<String> targets) { this.targets = targets; }

        @Override
        public byte[] transform(ClassLoader loader, String className, Class<?> redefined,
                                ProtectionDomain domain, byte[] bytes) {
            if (loader != null || className == null || !targets.contains(className)) return null;
            try {
                return Hooks.rewrite(className, bytes);
            } catch (Throwable t) {
                failure = className + ": " + oneLine(t);
                return null;
            }
        }
    }

    private static synchronized void startLeaseThread() {
        if (leaseThread != null) return;
        Thread t = new Thread(Agent::leaseLoop, "gridbpf-jvm-lease");
        t.setDaemon(true);
        t.start();
        leaseThread = t;
        try {
            Runtime.getRuntime().addShutdownHook(new Thread(() -> {
                Control.flushHeld(true);      // the batched records of the last requests
                removeDir();
            }, "gridbpf-jvm-cleanup"));
        } catch (Throwable ignored) {
            // already shutting down: nothing to clean then
        }
    }

    /** At JVM exit: the agent's directory goes (jar, agent.json, leases), nothing stale is left in /tmp. */
    private static void removeDir() {
        try {
            String d;
            synchronized (Agent.class) { d = dir; }
            File[] files = d == null ? null : new File(d).listFiles();
            if (files == null) return;
            for (File f : files) f.delete();
            new File(d).delete();
        } catch (Throwable ignored) {
            // best effort
        }
    }

    /**
     * Leases are looked at 5 times a second, so a tracer that finds the agent loaded sees it
     * active within 0.2 s (it waits for agent.json to say so); the counts in agent.json are
     * refreshed at most once a second.
     */
    private static void leaseLoop() {
        long lastRecords = -1, lastErrors = -1, lastWrite = 0;
        int lastState = 0;
        while (true) {
            try {
                Thread.sleep(200);
                String d;
                synchronized (Agent.class) { d = dir; }
                boolean active = Control.refreshLease(d);
                // a tracer waits for agent.json to show active with its transport: write at once
                int state = (active ? 1 : 0) | (Control.flag("viaWrite") ? 2 : 0) | (Control.flag("viaRecv") ? 4 : 0);
                long r = Control.records(), e = Control.errors(), now = System.nanoTime();
                boolean counts = (r != lastRecords || e != lastErrors) && now - lastWrite >= 1_000_000_000L;
                if (state != lastState || counts) {
                    synchronized (Agent.class) { writeInfo(); }
                    lastRecords = r; lastErrors = e; lastState = state; lastWrite = now;
                }
            } catch (InterruptedException ie) {
                return;
            } catch (Throwable ignored) {
                // keep going: the next second may succeed (directory recreated by a tracer)
            }
        }
    }

    /** agent.json, written atomically (tmp + rename). */
    private static void writeInfo() throws Exception {
        if (dir == null) return;
        StringBuilder j = new StringBuilder(512);
        j.append("{\"version\": 1");
        j.append(", \"pid\": ").append(ProcessHandle.current().pid());
        j.append(", \"starttime\": ").append(procStartTime());
        j.append(", \"bridge_fd\": ").append(bridgeFd);
        j.append(", \"bridge_recv_fd\": ").append(recvFd);
        j.append(", \"via_write\": ").append(Control.flag("viaWrite"));
        j.append(", \"via_recv\": ").append(Control.flag("viaRecv"));
        j.append(", \"recv_unexpected\": ").append(Control.recvUnexpected());
        j.append(", \"java_version\": ").append(quote(System.getProperty("java.version", "")));
        j.append(", \"vm\": ").append(quote(System.getProperty("java.vm.name", "")));
        j.append(", \"hooks\": [");
        for (int i = 0; i < hooks.size(); i++) j.append(i > 0 ? ", " : "").append(quote(hooks.get(i)));
        j.append("], \"skipped\": {");
        int i = 0;
        for (Map.Entry<String, String> e : skipped.entrySet())
            j.append(i++ > 0 ? ", " : "").append(quote(e.getKey())).append(": ").append(quote(e.getValue()));
        j.append("}, \"bytecode\": \"jdk.internal.org.objectweb.asm\"");
        j.append(", \"installed\": ").append(Control.installed());
        j.append(", \"failure\": ").append(quote(failure));
        j.append(", \"active\": ").append(Control.active());
        j.append(", \"attaches\": ").append(attaches);
        j.append(", \"sink\": ").append(quote(sinkPath));
        j.append(", \"records\": ").append(Control.records());
        j.append(", \"calls\": ").append(Control.calls());
        j.append(", \"errors\": ").append(Control.errors());
        j.append(", \"last_error\": ").append(quote(Control.lastError()));
        j.append("}\n");
        File target = new File(dir, "agent.json");
        File tmp = new File(dir, ".agent.json.tmp");
        Files.write(tmp.toPath(), j.toString().getBytes(StandardCharsets.UTF_8));
        Files.move(tmp.toPath(), target.toPath(), StandardCopyOption.REPLACE_EXISTING, StandardCopyOption.ATOMIC_MOVE);
    }

    /** Field 22 of /proc/self/stat: lets a tracer tell this JVM from an earlier one with the same pid. */
    static long procStartTime() {
        try {
            String stat = new String(Files.readAllBytes(new File("/proc/self/stat").toPath()), StandardCharsets.US_ASCII);
            String[] f = stat.substring(stat.lastIndexOf(')') + 2).trim().split(" ");
            return Long.parseLong(f[19]);
        } catch (Throwable t) {
            return -1;
        }
    }

    static Map<String, String> parseArgs(String args) {
        Map<String, String> m = new LinkedHashMap<>();
        if (args == null) return m;
        for (String part : args.split(",")) {
            int eq = part.indexOf('=');
            if (eq > 0) m.put(part.substring(0, eq).trim(), part.substring(eq + 1).trim());
        }
        return m;
    }

    static String oneLine(Throwable t) {
        String s = t.getClass().getName() + (t.getMessage() == null ? "" : ": " + t.getMessage());
        return s.replace('\n', ' ').replace('\r', ' ');
    }

    static String quote(String s) {
        StringBuilder b = new StringBuilder(s.length() + 2).append('"');
        for (char c : s.toCharArray()) {
            if (c == '"' || c == '\\') b.append('\\').append(c);
            else if (c < 0x20) b.append(String.format("\\u%04x", (int) c));
            else b.append(c);
        }
        return b.append('"').toString();
    }
}
