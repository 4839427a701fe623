package gridbpf.jvm.agent;

import jdk.internal.org.objectweb.asm.ClassReader;
import jdk.internal.org.objectweb.asm.ClassVisitor;
import jdk.internal.org.objectweb.asm.ClassWriter;
import jdk.internal.org.objectweb.asm.FieldVisitor;
import jdk.internal.org.objectweb.asm.MethodVisitor;
import jdk.internal.org.objectweb.asm.Opcodes;

import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * The hook table and the bytecode rewriting, with the JDK's own internal ASM copy
 * (jdk.internal.org.objectweb.asm in java.base): it always reads the running JDK's class files
 * (17 and 21 alike), and is exported to this agent at run time with Instrumentation.redefineModule.
 *
 * The injected code is straight-line: load arguments, call one static method of the bridge, no
 * branch, no try/catch, no new local. So no stack map frame changes and no class loading during
 * the transformation (no COMPUTE_FRAMES).
 */
final class Hooks {
    static final String BRIDGE = "sun/security/ssl/GridbpfTlsBridge";
    static final String BUFFERS = "[Ljava/nio/ByteBuffer;";
    static final String RESULT = "Ljavax/net/ssl/SSLEngineResult;";
    static final String ENGINE_CORE = "(" + BUFFERS + "II" + BUFFERS + "II)" + RESULT;
    static final String SSL_SOCKET = "sun/security/ssl/SSLSocketImpl";

    enum Kind { WRAP, UNWRAP, ENGINE_CLOSE, SOCKET_READ, SOCKET_WRITE, SOCKET_CLOSE, NOT_IMPLEMENTED }

    static final class Hook {
        final String owner, method, desc;
        final Kind kind;
        Hook(String owner, String method, String desc, Kind kind) {
            this.owner = owner; this.method = method; this.desc = desc; this.kind = kind;
        }
        String label() { return owner.replace('/', '.') + "." + method; }
    }

    /**
     * HOOK POINTS. The 6-argument ByteBuffer[] wrap/unwrap are the cores every other overload
     * delegates to (javap -c on JDK 17 and 21); the socket streams' array read/write likewise.
     */
    static final Hook[] TABLE = {
        new Hook("sun/security/ssl/SSLEngineImpl", "wrap", ENGINE_CORE, Kind.WRAP),
        new Hook("sun/security/ssl/SSLEngineImpl", "unwrap", ENGINE_CORE, Kind.UNWRAP),
        new Hook("sun/security/ssl/SSLEngineImpl", "closeOutbound", "()V", Kind.ENGINE_CLOSE),
        new Hook(SSL_SOCKET + "$AppInputStream", "read", "([BII)I", Kind.SOCKET_READ),
        new Hook(SSL_SOCKET + "$AppOutputStream", "write", "([BII)V", Kind.SOCKET_WRITE),
        new Hook(SSL_SOCKET, "close", "()V", Kind.SOCKET_CLOSE),
        // Conscrypt hook point, NOT implemented (Conscrypt is not in Debian). Its engine has the
        // same wrap/unwrap cores: give these entries Kind.WRAP/UNWRAP once tested against it.
        new Hook("org/conscrypt/ConscryptEngine", "wrap", ENGINE_CORE, Kind.NOT_IMPLEMENTED),
        new Hook("org/conscrypt/ConscryptEngine", "unwrap", ENGINE_CORE, Kind.NOT_IMPLEMENTED),
    };

    /** The JDK classes to rewrite (internal names), in table order. */
    static List<String> targetClasses() {
        List<String> names = new ArrayList<>();
        for (Hook h : TABLE)
            if (h.kind != Kind.NOT_IMPLEMENTED && !names.contains(h.owner)) names.add(h.owner);
        return names;
    }

    static Map<String, String> notImplemented() {
        Map<String, String> m = new LinkedHashMap<>();
        for (Hook h : TABLE)
            if (h.kind == Kind.NOT_IMPLEMENTED) m.put(h.label(), "hook point only, not implemented");
        return m;
    }

    /**
     * Rewrites one class. Returns the new bytes, or throws IllegalStateException naming what is
     * missing (a hook method, or the this$0 field the stream hooks read): then nothing changes.
     */
    static byte[] rewrite(String className, byte[] original) {
        ClassReader reader = new ClassReader(original);
        ClassWriter writer = new ClassWriter(reader, 0);
        HookClassVisitor visitor = new HookClassVisitor(writer, className);
        reader.accept(visitor, 0);
        for (Hook h : TABLE) {
            if (!h.owner.equals(className) || h.kind == Kind.NOT_IMPLEMENTED) continue;
            if (!visitor.done.contains(h)) throw new IllegalStateException("method not found: " + h.label() + h.desc);
        }
        if (visitor.needsOuter && !visitor.hasOuter)
            throw new IllegalStateException("field this$0 not found in " + className);
        byte[] out = writer.toByteArray();
        new ClassReader(out).accept(new ClassVisitor(Opcodes.ASM8) { }, 0);  // parses back
        return out;
    }

    private static final class HookClassVisitor extends ClassVisitor {
        final String className;
        final List<Hook> done = new ArrayList<>();
        boolean needsOuter, hasOuter;

        HookClassVisitor(ClassVisitor next, String className) {
            super(Opcodes.ASM8, next);
            this.className = className;
        }

        @Override
        public FieldVisitor visitField(int access, String name, String desc, String sig, Object value) {
            if (name.equals("this$0") && desc.equals("L" + SSL_SOCKET + ";")) hasOuter = true;
            return super.visitField(access, name, desc, sig, value);
        }

        @Override
        public MethodVisitor visitMethod(int access, String name, String desc, String sig, String[] exc) {
            MethodVisitor mv = super.visitMethod(access, name, desc, sig, exc);
            for (Hook h : TABLE) {
                if (h.kind == Kind.NOT_IMPLEMENTED || !h.owner.equals(className)
                        || !h.method.equals(name) || !h.desc.equals(desc)) continue;
                if ((access & Opcodes.ACC_STATIC) != 0 || done.contains(h)) continue;
                done.add(h);
                if (h.kind == Kind.SOCKET_READ || h.kind == Kind.SOCKET_WRITE) needsOuter = true;
                return new HookMethodVisitor(mv, h, className);
            }
            return mv;
        }
    }

    private static final class HookMethodVisitor extends MethodVisitor {
        final Hook hook;
        final String className;

        HookMethodVisitor(MethodVisitor next, Hook hook, String className) {
            super(Opcodes.ASM8, next);
            this.hook = hook;
            this.className = className;
        }

        private void call(String name, String desc) {
            super.visitMethodInsn(Opcodes.INVOKESTATIC, BRIDGE, name, desc, false);
        }

        private void outerSocket() {
            super.visitVarInsn(Opcodes.ALOAD, 0);
            super.visitFieldInsn(Opcodes.GETFIELD, className, "this$0", "L" + SSL_SOCKET + ";");
        }

        @Override
        public void visitCode() {
            super.visitCode();
            switch (hook.kind) {
                case WRAP:      // the sources: srcs, srcsOffset, srcsLength
                    super.visitVarInsn(Opcodes.ALOAD, 0);
                    super.visitVarInsn(Opcodes.ALOAD, 1);
                    super.visitVarInsn(Opcodes.ILOAD, 2);
                    super.visitVarInsn(Opcodes.ILOAD, 3);
                    call("wrapEnter", "(Ljava/lang/Object;" + BUFFERS + "II)V");
                    break;
                case UNWRAP:    // the destinations: dsts, dstsOffset, dstsLength
                    super.visitVarInsn(Opcodes.ALOAD, 0);
                    super.visitVarInsn(Opcodes.ALOAD, 4);
                    super.visitVarInsn(Opcodes.ILOAD, 5);
                    super.visitVarInsn(Opcodes.ILOAD, 6);
                    call("unwrapEnter", "(Ljava/lang/Object;" + BUFFERS + "II)V");
                    break;
                case ENGINE_CLOSE:
                    super.visitVarInsn(Opcodes.ALOAD, 0);
                    call("engineClose", "(Ljava/lang/Object;)V");
                    break;
                case SOCKET_READ:
                    outerSocket();
                    super.visitVarInsn(Opcodes.ALOAD, 1);
                    super.visitVarInsn(Opcodes.ILOAD, 2);
                    call("readEnter", "(Ljava/lang/Object;[BI)V");
                    break;
                case SOCKET_WRITE:
                    outerSocket();
                    super.visitVarInsn(Opcodes.ALOAD, 1);
                    super.visitVarInsn(Opcodes.ILOAD, 2);
                    super.visitVarInsn(Opcodes.ILOAD, 3);
                    call("writeEnter", "(Ljava/lang/Object;[BII)V");
                    break;
                case SOCKET_CLOSE:
                    super.visitVarInsn(Opcodes.ALOAD, 0);
                    call("socketClose", "(Ljava/lang/Object;)V");
                    break;
                default:
                    break;
            }
        }

        @Override
        public void visitInsn(int opcode) {
            switch (hook.kind) {
                case WRAP:
                case UNWRAP:
                    if (opcode == Opcodes.ARETURN) {
                        super.visitInsn(Opcodes.DUP);
                        super.visitVarInsn(Opcodes.ALOAD, 0);
                        call(hook.kind == Kind.WRAP ? "wrapExit" : "unwrapExit", "(" + RESULT + "Ljava/lang/Object;)V");
                    }
                    break;
                case SOCKET_READ:
                    if (opcode == Opcodes.IRETURN) {
                        super.visitInsn(Opcodes.DUP);
                        call("readExit", "(I)V");
                    }
                    break;
                case SOCKET_WRITE:
                    if (opcode == Opcodes.RETURN) call("writeExit", "()V");
                    break;
                default:
                    break;
            }
            super.visitInsn(opcode);
        }

        @Override
        public void visitMaxs(int maxStack, int maxLocals) {
            super.visitMaxs(maxStack + 4, maxLocals);   // the injected argument loads
        }
    }
}
