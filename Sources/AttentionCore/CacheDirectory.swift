import Foundation

/// Where AttentionKit keeps files between processes (built OpenCL programs, the tuned machine
/// profile): `$ATTENTIONKIT_CACHE_DIR`, else `$XDG_CACHE_HOME/attentionkit`, else
/// `~/.cache/attentionkit`. `nil` when none can be determined.
public enum CacheDirectory {
    public static var url: URL? {
        let env = ProcessInfo.processInfo.environment
        if let dir = env["ATTENTIONKIT_CACHE_DIR"], !dir.isEmpty { return URL(fileURLWithPath: dir) }
        if let xdg = env["XDG_CACHE_HOME"], !xdg.isEmpty { return URL(fileURLWithPath: xdg).appendingPathComponent("attentionkit") }
        if let home = env["HOME"], !home.isEmpty { return URL(fileURLWithPath: home).appendingPathComponent(".cache/attentionkit") }
        return nil
    }
}
