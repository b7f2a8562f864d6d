#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// Memory for large, long-lived buffers that are read in scattered order, such as K/V page pools:
/// decode visits a pool's pages in whatever order the block tables give, so with 4 KiB pages nearly
/// every page costs a TLB walk. On Linux, buffers of at least `hugePageBytes` are aligned to 2 MiB
/// and advised for transparent huge pages (`madvise(MADV_HUGEPAGE)`, which the default
/// "madvise" setting honours); elsewhere, and for smaller buffers, it is plain aligned memory.
/// The advice changes no result: it is a hint the kernel may ignore.
public enum PoolMemory {
    /// The huge-page size advised for (x86-64 and most aarch64 kernels).
    public static let hugePageBytes = 2 << 20

    /// `byteCount` bytes aligned to at least 64, or nil when the system has no such memory.
    /// Release with `deallocate(_:)`.
    public static func allocate(byteCount: Int) -> UnsafeMutableRawPointer? {
        let size = max(64, byteCount)
        var memory: UnsafeMutableRawPointer?
        #if os(Linux)
            if size >= hugePageBytes {
                let rounded = (size + hugePageBytes - 1) / hugePageBytes * hugePageBytes
                guard posix_memalign(&memory, hugePageBytes, rounded) == 0, let memory else { return nil }
                _ = madvise(memory, rounded, MADV_HUGEPAGE)
                return memory
            }
        #endif
        guard posix_memalign(&memory, 64, size) == 0 else { return nil }
        return memory
    }

    /// Releases memory from `allocate(byteCount:)`.
    public static func deallocate(_ memory: UnsafeMutableRawPointer) { free(memory) }
}
