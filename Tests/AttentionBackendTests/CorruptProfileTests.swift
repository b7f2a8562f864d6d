import AttentionCore
import AttentionKit
import AttentionVerification
import Foundation
import Testing

/// `profile.json` written by `attnbench tune` and then damaged, replaced or hand-edited: the built-in
/// defaults are used instead, the profile's `source` says which file was ignored and why, and the
/// dispatcher works as on a fresh machine. Never a crash.
@Suite struct CorruptProfiles {
    struct Damage: CustomTestStringConvertible, Sendable {
        var name: String
        /// The file's new bytes, from the good file's.
        var apply: @Sendable (Data) -> Data?
        /// Words the reason must contain.
        var reason: String
        var testDescription: String { name }
    }

    static func edited(_ data: Data, _ edit: (inout [String: Any]) -> Void) -> Data? {
        guard var object = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else { return nil }
        edit(&object)
        return try? JSONSerialization.data(withJSONObject: object)
    }

    static func editBackends(_ data: Data, _ edit: @escaping (inout [String: Any]) -> Void) -> Data? {
        edited(data) { object in
            guard var backends = object["backends"] as? [[String: Any]] else { return }
            for index in backends.indices { edit(&backends[index]) }
            object["backends"] = backends
        }
    }

    static let damages: [Damage] = [
        Damage(name: "empty", apply: { _ in Data() }, reason: "invalid JSON"),
        Damage(name: "truncated", apply: { $0.prefix($0.count / 2) }, reason: "invalid JSON"),
        Damage(
            name: "binary garbage", apply: { _ in Data((0..<300).map { UInt8(($0 * 37 + 11) % 256) }) },
            reason: "invalid JSON"),
        Damage(name: "a JSON array", apply: { _ in Data("[1, 2, 3]".utf8) }, reason: "wrong type"),
        Damage(
            name: "no backends", apply: { edited($0) { $0.removeValue(forKey: "backends") } },
            reason: "missing \"backends\""),
        Damage(
            name: "another machine", apply: { edited($0) { $0["identity"] = "cpu=Some Other CPU;cores=128" } },
            reason: "another machine"),
        Damage(
            name: "string where a number goes",
            apply: { editBackends($0) { $0["overheadSeconds"] = "fast" } }, reason: "wrong type"),
        Damage(
            name: "negative overhead", apply: { editBackends($0) { $0["overheadSeconds"] = -1.0 } },
            reason: "invalid value"),
        Damage(
            name: "zero-row BLAS tiling",
            apply: {
                editBackends($0) { entry in
                    if (entry["backend"] as? String) == "blas" {
                        entry["blasTilings"] = [["headDim": 64, "value": ["queryRows": 0, "keyBlock": 64]]]
                    }
                }
            }, reason: "tiling"),
        Damage(
            name: "curve at key length 0",
            apply: {
                editBackends($0) { $0["decodeGBps"] = ["points": [["keyLength": 0, "value": 5.0]]] }
            }, reason: "decode GB/s point"),
    ]

    @Test(arguments: damages)
    func damagedProfileMeansDefaultsWithTheReason(_ damage: Damage) throws {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("attentionkit-profile-\(UUID())")
        defer { try? FileManager.default.removeItem(at: folder) }
        let configuration = AttentionConfiguration(cacheDirectory: folder)
        var good = MachineProfile.defaults(configuration: configuration)
        good.source = "measured by the test"
        try good.save(configuration: configuration)
        let file = try #require(MachineProfile.fileURL(configuration: configuration))
        #expect(MachineProfile.load(configuration: configuration) == good, "the undamaged file is not used")

        let data = try Data(contentsOf: file)
        let damaged = try #require(damage.apply(data), "the damage could not be applied")
        try damaged.write(to: file)
        let loaded = MachineProfile.load(configuration: configuration)
        #expect(loaded.source.hasPrefix("built-in defaults"), "\(loaded.source)")
        #expect(loaded.source.contains(file.path) && loaded.source.contains("ignored"), "\(loaded.source)")
        #expect(loaded.source.contains(damage.reason), "\(loaded.source)")
        #expect(loaded.backends == MachineProfile.defaults(configuration: configuration).backends)

        // The dispatcher built on it decides as on a fresh machine.
        let dispatcher = Dispatcher(configuration: configuration, profile: loaded)
        let problem = try VerificationCase(heads: (4, 2), nq: 9, nk: 33, d: 16, dv: 16).problem()
        #expect(dispatcher.decide(problem).reason.contains(damage.reason))
    }

    @Test func profilePathThatIsAFolderMeansDefaults() throws {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("attentionkit-profile-\(UUID())")
        defer { try? FileManager.default.removeItem(at: folder) }
        let configuration = AttentionConfiguration(cacheDirectory: folder)
        let file = try #require(MachineProfile.fileURL(configuration: configuration))
        try FileManager.default.createDirectory(at: file, withIntermediateDirectories: true)
        let loaded = MachineProfile.load(configuration: configuration)
        #expect(
            loaded.source.hasPrefix("built-in defaults") && loaded.source.contains("unreadable"), "\(loaded.source)")
    }
}
