package sun.security.ssl;

/** The bridge's per-thread state holder (a named class: the bridge is defined class by class). */
final class GridbpfTlsLocal extends ThreadLocal<GridbpfTlsState> {
    @Override
    protected GridbpfTlsState initialValue() {
        return new GridbpfTlsState();
    }
}
