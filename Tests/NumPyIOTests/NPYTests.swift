import Foundation
import NumPyIO
import Testing

/// Builds a .npy file by hand: preamble, header text (padded), payload.
func npyBytes(version: UInt8 = 1, header: String, payload: [UInt8], pad: Bool = true) -> Data {
    var text = header
    let preamble = version == 1 ? 10 : 12
    if pad {
        let total = preamble + text.utf8.count + 1
        text += String(repeating: " ", count: (64 - total % 64) % 64) + "\n"
    }
    var data = Data([0x93, 0x4E, 0x55, 0x4D, 0x50, 0x59, version, 0])
    let n = text.utf8.count
    data.append(UInt8(n & 0xFF))
    data.append(UInt8((n >> 8) & 0xFF))
    if version != 1 {
        data.append(UInt8((n >> 16) & 0xFF))
        data.append(UInt8((n >> 24) & 0xFF))
    }
    data.append(contentsOf: Array(text.utf8))
    data.append(contentsOf: payload)
    return data
}

func littleEndianBytes<T: FixedWidthInteger>(_ values: [T]) -> [UInt8] {
    values.flatMap { v in withUnsafeBytes(of: v.littleEndian) { Array($0) } }
}

@Suite struct NPYReading {
    @Test func roundTripsFloatsAndBools() throws {
        for shape in [[2, 3, 4, 5], [7], [], [1, 1, 1, 1]] {
            let count = shape.reduce(1, *)
            let floats = NPYArray(shape: shape, floats: (0..<count).map { Float($0) * 0.5 - 3 })
            #expect(try NPYArray.parse(floats.encoded(), file: "f.npy") == floats)
            let bools = NPYArray(shape: shape, bools: (0..<count).map { $0 % 3 == 0 })
            #expect(try NPYArray.parse(bools.encoded(), file: "b.npy") == bools)
        }
    }

    @Test func writerPadsHeaderTo64Bytes() {
        let data = NPYArray(shape: [3, 2], floats: Array(repeating: 1, count: 6)).encoded()
        let headerLength = Int(data[8]) | Int(data[9]) << 8
        #expect((10 + headerLength) % 64 == 0)
        #expect(data[10 + headerLength - 1] == 0x0A)
        #expect(String(decoding: data[10..<(10 + headerLength)], as: UTF8.self).contains("'shape': (3, 2)"))
    }

    @Test func writesAndReadsFiles() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("npy-\(UUID().uuidString).npy").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        let a = NPYArray(shape: [2, 2], floats: [1, -2, .infinity, 0.25])
        try a.write(to: path)
        #expect(try NPYArray.read(contentsOf: path) == a)
    }

    @Test func convertsFloat64AndFloat16() throws {
        let f8 = npyBytes(
            header: "{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }",
            payload: littleEndianBytes([1.5, -2.25, 1e-3].map { ($0 as Double).bitPattern }))
        let a = try NPYArray.parse(f8, file: "a.npy")
        #expect(a.floats == [1.5, -2.25, Float(1e-3)])
        #expect(a.fileDType == .float64)
        // 1.0, -2.0, 65504 (max half), smallest subnormal 2^-24, +inf, 0.333 (0x3555)
        let halves: [UInt16] = [0x3C00, 0xC000, 0x7BFF, 0x0001, 0x7C00, 0x3555]
        let f2 = npyBytes(
            header: "{'descr': '<f2', 'fortran_order': False, 'shape': (2, 3), }", payload: littleEndianBytes(halves))
        let h = try NPYArray.parse(f2, file: "h.npy")
        #expect(h.shape == [2, 3])
        #expect(h.floats?[0...4] == [1, -2, 65504, Float(sign: .plus, exponent: -24, significand: 1), .infinity])
        #expect(abs((h.floats?[5] ?? 0) - 0.33325195) < 1e-7)
    }

    @Test func readsVersion2And3HeadersAndNumPySpellings() throws {
        for version: UInt8 in [2, 3] {
            let d = npyBytes(
                version: version, header: "{\"descr\": \"<f4\", \"shape\": (1, 2), \"fortran_order\": False}",
                payload: littleEndianBytes([Float(1).bitPattern, Float(2).bitPattern]))
            #expect(try NPYArray.parse(d, file: "v.npy").floats == [1, 2])
        }
        let b = npyBytes(header: "{'descr': '|b1', 'fortran_order': False, 'shape': (3,), }", payload: [1, 0, 2])
        #expect(try NPYArray.parse(b, file: "b.npy").bools == [true, false, true])
        let u = npyBytes(header: "{'descr': '|u1', 'fortran_order': False, 'shape': (2,), }", payload: [0, 1])
        #expect(try NPYArray.parse(u, file: "u.npy").bools == [false, true])
        let longs = npyBytes(
            header: "{'descr': '<f4', 'fortran_order': False, 'shape': (1L, 1L), }",
            payload: littleEndianBytes([Float(3).bitPattern]))
        #expect(try NPYArray.parse(longs, file: "l.npy").shape == [1, 1])
    }

    static let good = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }"
    static let goodPayload = littleEndianBytes([Float(1).bitPattern, Float(2).bitPattern])

    @Test(
        arguments: [
            ("not npy", Data("hello world, not numpy".utf8), NPYError.notNPY(file: "x.npy")),
            ("empty", Data(), NPYError.notNPY(file: "x.npy")),
            ("magic only", Data([0x93, 0x4E, 0x55]), NPYError.truncated(file: "x.npy", detail: "only 3 bytes")),
            (
                "no header length", Data([0x93, 0x4E, 0x55, 0x4D, 0x50, 0x59, 1, 0, 10]),
                NPYError.truncated(file: "x.npy", detail: "header length missing")
            ),
            (
                "version 4", npyBytes(version: 4, header: good, payload: goodPayload),
                NPYError.unsupportedVersion(file: "x.npy", major: 4, minor: 0)
            ),
            (
                "big endian",
                npyBytes(header: "{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", payload: goodPayload),
                NPYError.unsupportedDType(file: "x.npy", dtype: ">f4")
            ),
            (
                "uint32",
                npyBytes(header: "{'descr': '<u4', 'fortran_order': False, 'shape': (2,), }", payload: goodPayload),
                NPYError.unsupportedDType(file: "x.npy", dtype: "<u4")
            ),
            (
                "structured",
                npyBytes(
                    header: "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }", payload: goodPayload),
                NPYError.malformedHeader(file: "x.npy", detail: "expected a quoted string at offset 10")
            ),
            (
                "fortran",
                npyBytes(header: "{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }", payload: goodPayload),
                NPYError.fortranOrder(file: "x.npy")
            ),
            (
                "truncated data", npyBytes(header: good, payload: Array(goodPayload.prefix(6))),
                NPYError.truncated(file: "x.npy", detail: "shape [2] needs 8 data bytes, only 6 present")
            ),
            (
                "lying header", npyBytes(header: good, payload: goodPayload + [0, 0, 0, 0]),
                NPYError.sizeMismatch(file: "x.npy", shape: [2], expectedBytes: 8, actualBytes: 12)
            ),
            (
                "absurd shape",
                npyBytes(
                    header: "{'descr': '<f4', 'fortran_order': False, 'shape': (4000000000, 4000000000, 4000000000), }",
                    payload: goodPayload),
                NPYError.tooLarge(file: "x.npy", shape: [4_000_000_000, 4_000_000_000, 4_000_000_000])
            ),
            (
                "huge shape",
                npyBytes(
                    header: "{'descr': '<f4', 'fortran_order': False, 'shape': (100000, 100000), }",
                    payload: goodPayload),
                NPYError.truncated(
                    file: "x.npy", detail: "shape [100000, 100000] needs 40000000000 data bytes, only 8 present")
            ),
            (
                "missing shape", npyBytes(header: "{'descr': '<f4', 'fortran_order': False, }", payload: goodPayload),
                NPYError.malformedHeader(file: "x.npy", detail: "header must have 'descr', 'fortran_order' and 'shape'")
            ),
            (
                "unknown key",
                npyBytes(
                    header: "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}", payload: goodPayload),
                NPYError.malformedHeader(file: "x.npy", detail: "unexpected key 'x'")
            ),
            (
                "negative dim",
                npyBytes(header: "{'descr': '<f4', 'fortran_order': False, 'shape': (-2,), }", payload: goodPayload),
                NPYError.malformedHeader(file: "x.npy", detail: "expected a non-negative integer in shape at offset 51")
            ),
            (
                "garbage after dict", npyBytes(header: good + " junk", payload: goodPayload),
                NPYError.malformedHeader(file: "x.npy", detail: "trailing characters after the dictionary")
            ),
            (
                "header past end", npyBytes(header: good, payload: []).prefix(30),
                NPYError.truncated(file: "x.npy", detail: "header claims 118 bytes, file has 20 after the preamble")
            ),
        ] as [(String, Data, NPYError)])
    func malformedFilesGiveTheirError(_ name: String, _ data: Data, _ expected: NPYError) {
        #expect(throws: expected, "\(name)") { try NPYArray.parse(data, file: "x.npy") }
        #expect(expected.description.hasPrefix("x.npy: "))
    }

    @Test func missingFileNamesThePath() {
        do {
            _ = try NPYArray.read(contentsOf: "/nonexistent/q.npy")
            Issue.record("expected an error")
        } catch {
            #expect(error.file == "/nonexistent/q.npy")
            if case .cannotOpen = error {} else { Issue.record("expected cannotOpen, got \(error)") }
        }
    }
}
