/// The three fields of a `.npy` header dictionary, parsed strictly.
///
/// The header is a Python literal such as `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`.
/// This parser accepts exactly that grammar (string keys, a string, a bool, a tuple of non-negative
/// integers, optional trailing commas and whitespace) and rejects anything else.
struct NPYHeader {
    var descr: String
    var fortranOrder: Bool
    var shape: [Int]

    static let maxRank = 32

    static func parse(_ text: String, file: String) throws(NPYError) -> NPYHeader {
        var scanner = Scanner(chars: Array(text.unicodeScalars), file: file)
        var descr: String?
        var fortran: Bool?
        var shape: [Int]?
        try scanner.expect("{")
        while true {
            scanner.skipSpace()
            if scanner.peek() == "}" {
                scanner.index += 1
                break
            }
            let key = try scanner.string()
            try scanner.expect(":")
            switch key {
            case "descr": descr = try scanner.string()
            case "fortran_order": fortran = try scanner.bool()
            case "shape": shape = try scanner.tuple()
            default: throw .malformedHeader(file: file, detail: "unexpected key '\(key)'")
            }
            scanner.skipSpace()
            if scanner.peek() == "," {
                scanner.index += 1
                continue
            }
            try scanner.expect("}")
            break
        }
        scanner.skipSpace()
        guard scanner.index == scanner.chars.count else {
            throw .malformedHeader(file: file, detail: "trailing characters after the dictionary")
        }
        guard let descr, let fortran, let shape else {
            throw .malformedHeader(file: file, detail: "header must have 'descr', 'fortran_order' and 'shape'")
        }
        return NPYHeader(descr: descr, fortranOrder: fortran, shape: shape)
    }

    private struct Scanner {
        let chars: [Unicode.Scalar]
        let file: String
        var index = 0

        init(chars: [Unicode.Scalar], file: String) {
            self.chars = chars
            self.file = file
        }

        func peek() -> Unicode.Scalar? { index < chars.count ? chars[index] : nil }

        mutating func skipSpace() {
            while let c = peek(), c == " " || c == "\n" || c == "\t" || c == "\r" { index += 1 }
        }

        mutating func expect(_ c: Unicode.Scalar) throws(NPYError) {
            skipSpace()
            guard peek() == c else {
                throw .malformedHeader(file: file, detail: "expected '\(c)' at offset \(index)")
            }
            index += 1
        }

        mutating func string() throws(NPYError) -> String {
            skipSpace()
            guard let quote = peek(), quote == "'" || quote == "\"" else {
                throw .malformedHeader(file: file, detail: "expected a quoted string at offset \(index)")
            }
            index += 1
            var out = String.UnicodeScalarView()
            while let c = peek(), c != quote {
                out.append(c)
                index += 1
                guard out.count <= 64 else {
                    throw .malformedHeader(file: file, detail: "string too long at offset \(index)")
                }
            }
            guard peek() == quote else { throw .malformedHeader(file: file, detail: "unterminated string") }
            index += 1
            return String(out)
        }

        mutating func bool() throws(NPYError) -> Bool {
            skipSpace()
            for (word, value) in [("True", true), ("False", false)] {
                let scalars = Array(word.unicodeScalars)
                if index + scalars.count <= chars.count, Array(chars[index..<index + scalars.count]) == scalars {
                    index += scalars.count
                    return value
                }
            }
            throw .malformedHeader(file: file, detail: "expected True or False at offset \(index)")
        }

        mutating func tuple() throws(NPYError) -> [Int] {
            try expect("(")
            var dims: [Int] = []
            while true {
                skipSpace()
                if peek() == ")" {
                    index += 1
                    break
                }
                var value = 0
                var digits = 0
                while let c = peek(), let digit = Int(String(c)), c.isASCII {
                    let (times, o1) = value.multipliedReportingOverflow(by: 10)
                    let (plus, o2) = times.addingReportingOverflow(digit)
                    guard !o1, !o2 else { throw .malformedHeader(file: file, detail: "dimension too large") }
                    value = plus
                    digits += 1
                    index += 1
                }
                // NumPy may write Python 2 longs as `3L`.
                if peek() == "L" { index += 1 }
                guard digits > 0 else {
                    throw .malformedHeader(
                        file: file, detail: "expected a non-negative integer in shape at offset \(index)")
                }
                dims.append(value)
                guard dims.count <= NPYHeader.maxRank else {
                    throw .malformedHeader(file: file, detail: "more than \(NPYHeader.maxRank) dimensions")
                }
                skipSpace()
                if peek() == "," {
                    index += 1
                    continue
                }
                try expect(")")
                break
            }
            return dims
        }
    }
}
