import Foundation
import TopiaryTensor

/// SplitMix64: every choice a fuzz case makes comes from one of these, seeded by the case's seed,
/// so that a seed reproduces its case exactly (nothing here reads the clock or iterates a
/// Dictionary or Set, whose order changes from run to run).
struct FuzzRandom {
    private var generator: SplitMix64
    init(seed: UInt64) { generator = SplitMix64(seed: seed) }

    mutating func next() -> UInt64 { generator.next() }

    /// Uniform in 0..<n (n > 0).
    mutating func below(_ n: Int) -> Int { Int(next() % UInt64(max(n, 1))) }
    mutating func chance(_ p: Double) -> Bool { Double(next() >> 11) / Double(1 << 53) < p }
    mutating func pick<T>(_ items: [T]) -> T { items[below(items.count)] }
    /// Uniform in [-scale, scale).
    mutating func float(_ scale: Float = 0.1) -> Float { (Float(next() >> 40) / Float(1 << 24) * 2 - 1) * scale }
    mutating func bytes(_ n: Int) -> [UInt8] { (0..<n).map { _ in UInt8(truncatingIfNeeded: next()) } }

    /// The seed of case `index` of a run seeded with `seed`.
    static func caseSeed(_ seed: UInt64, _ index: Int) -> UInt64 {
        var r = FuzzRandom(seed: seed ^ (UInt64(index) &* 0xD6E8_FEB8_6659_FD93))
        return r.next()
    }
}

/// Integers that break size arithmetic: zero, one, signed and unsigned limits, powers of two
/// around 2^31, 2^32, 2^40 and 2^63, and "2^32 x 2^32" halves.
enum Interesting {
    static let unsigned: [UInt64] = [
        0, 1, 2, 3, 7, 8, 31, 33, 255, 256, 1023, 4096, 65535, 65536, 1 << 20, 1 << 24, (1 << 31) - 1, 1 << 31,
        (1 << 32) - 1, 1 << 32, (1 << 32) + 1, 1 << 40, (1 << 40) + 1, 1 << 48, 1 << 62, (1 << 63) - 1, 1 << 63,
        UInt64.max - 1, UInt64.max,
    ]
    static let floats: [Double] = [.nan, .infinity, -.infinity, 0, -0.0, -1, 1, 1e-45, 1e-38, 1e38, 3.4e38, 1e300, -1e-5, 0.5, 2]
    /// Number literals for JSON: integers, negative, fractions, exponents, beyond Int64 and beyond Double.
    static let numbers: [String] = [
        "0", "1", "-1", "2", "3", "-0", "0.5", "1.5", "64", "65", "-64", "4096", "2147483647", "2147483648", "-2147483648",
        "4294967295", "4294967296", "1099511627776", "9223372036854775807", "9223372036854775808", "-9223372036854775809",
        "18446744073709551616", "1e15", "1e16", "1e300", "1e308", "1e309", "-1e309", "1e-300", "1e-320", "0.0",
        "1E400", "123456789012345678901234567890",
    ]
}

/// Where a little-endian integer of `width` bytes sits in a file (a length, count, dimension,
/// offset or type field), so that mutations can put interesting values exactly there.
struct IntField {
    var offset: Int
    var width: Int
    /// A float32 (or float64) slot: mutations write NaN, infinities, zero, negative and extreme values.
    var isFloat = false
}

/// One input file of a case, with its integer fields (if the builder knows them).
struct FuzzFile {
    var name: String
    var bytes: [UInt8]
    var fields: [IntField] = []
    /// Text files (JSON): mutations favour number literals and tokens over raw bytes.
    var isText = false
}

/// Byte-level mutations: bit flips, random and interesting bytes, truncation, insertion, deletion,
/// duplication and splices of chunks (from the same file or another), and interesting integers
/// written over the file's known integer fields.
enum Mutator {
    static func mutate(_ file: inout FuzzFile, donors: [[UInt8]], _ r: inout FuzzRandom, rounds: Int) {
        for _ in 0..<rounds {
            var b = file.bytes
            let n = b.count
            switch r.below(file.isText ? 12 : 11) {
            case 0 where n > 0:  // bit flip
                b[r.below(n)] ^= UInt8(1 << r.below(8))
            case 1 where n > 0:  // random byte
                b[r.below(n)] = UInt8(truncatingIfNeeded: r.next())
            case 2 where n > 0:  // interesting byte
                b[r.below(n)] = r.pick([0, 1, 0x7F, 0x80, 0xFF, 0x20, 0x22, 0x5C, 0x2C, 0x7B, 0x7D, 0x5B, 0x5D])
            case 3 where n > 0:  // truncation
                b.removeSubrange(r.below(n)..<n)
            case 4:  // insert random bytes
                let at = r.below(n + 1)
                b.insert(contentsOf: r.bytes(1 + r.below(16)), at: at)
            case 5 where n > 1:  // delete a chunk
                let at = r.below(n)
                b.removeSubrange(at..<min(n, at + 1 + r.below(64)))
            case 6 where n > 1:  // duplicate a chunk in place
                let at = r.below(n)
                let chunk = Array(b[at..<min(n, at + 1 + r.below(256))])
                b.insert(contentsOf: chunk, at: r.below(n + 1))
            case 7:  // splice a chunk from a donor (another seed input) over or into this one
                guard let donor = donors.isEmpty ? nil : r.pick(donors), !donor.isEmpty else { break }
                let from = r.below(donor.count)
                let chunk = Array(donor[from..<min(donor.count, from + 1 + r.below(512))])
                let at = r.below(n + 1)
                if r.chance(0.5) {
                    b.insert(contentsOf: chunk, at: at)
                } else {
                    b.replaceSubrange(at..<min(n, at + chunk.count), with: chunk)
                }
            case 8, 9:  // an interesting integer in a known field (or anywhere, 8 bytes wide)
                let field = file.fields.isEmpty || r.chance(0.1)
                    ? IntField(offset: r.below(max(n, 1)), width: r.pick([1, 2, 4, 8]))
                    : r.pick(file.fields)
                guard field.offset + field.width <= n else { break }
                if field.isFloat {
                    let f = r.pick(Interesting.floats)
                    let v: UInt64 = field.width == 8 ? f.bitPattern : UInt64(Float(f).bitPattern)
                    for k in 0..<field.width { b[field.offset + k] = UInt8(truncatingIfNeeded: v >> (8 * k)) }
                    break
                }
                var v = r.pick(Interesting.unsigned)
                if r.chance(0.2) { v = r.next() }
                if r.chance(0.1) { v = UInt64(bitPattern: -Int64(1 + r.below(4))) }
                for k in 0..<field.width { b[field.offset + k] = UInt8(truncatingIfNeeded: v >> (8 * k)) }
            case 10 where n > 0:  // arithmetic on a byte
                let at = r.below(n)
                b[at] = b[at] &+ UInt8(truncatingIfNeeded: r.below(70) - 35)
            case 11:  // a number literal replaced (text)
                replaceNumber(&b, &r)
            default:
                break
            }
            file.bytes = b
        }
    }

    /// Replaces one run of digits (with its sign, fraction and exponent) by an interesting literal.
    static func replaceNumber(_ b: inout [UInt8], _ r: inout FuzzRandom) {
        var starts: [Int] = []
        var i = 0
        while i < b.count {
            if (b[i] >= 0x30 && b[i] <= 0x39) || b[i] == UInt8(ascii: "-") {
                starts.append(i)
                while i < b.count, isNumberByte(b[i]) { i += 1 }
            } else {
                i += 1
            }
        }
        guard !starts.isEmpty else { return }
        let start = r.pick(starts)
        var end = start
        while end < b.count, isNumberByte(b[end]) { end += 1 }
        let literal = r.chance(0.85) ? r.pick(Interesting.numbers) : r.pick(["\"64\"", "true", "null", "[]", "{}", "NaN", "Infinity", "\"\""])
        b.replaceSubrange(start..<max(end, start + 1), with: Array(literal.utf8))
    }

    static func isNumberByte(_ c: UInt8) -> Bool {
        (c >= 0x30 && c <= 0x39) || c == UInt8(ascii: "-") || c == UInt8(ascii: "+") || c == UInt8(ascii: ".")
            || c == UInt8(ascii: "e") || c == UInt8(ascii: "E")
    }
}

/// Little-endian output with a record of where the integer fields went.
struct LEWriter {
    var bytes: [UInt8] = []
    var fields: [IntField] = []

    mutating func int<T: FixedWidthInteger>(_ v: T, field: Bool = true) {
        if field { fields.append(IntField(offset: bytes.count, width: MemoryLayout<T>.size)) }
        withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) }
    }
    /// A float32; with `field`, recorded as a float slot for mutation.
    mutating func f32(_ v: Float, field: Bool = false) {
        if field { fields.append(IntField(offset: bytes.count, width: 4, isFloat: true)) }
        int(v.bitPattern, field: false)
    }
    mutating func raw(_ b: [UInt8]) { bytes.append(contentsOf: b) }
    mutating func pad(to alignment: Int) { while bytes.count % alignment != 0 { bytes.append(0) } }
}

/// A JSON value with keys in a fixed order and numbers kept as literal text, so that hostile
/// literals ("1e400", "9223372036854775808") can be written, and output is the same every run.
indirect enum JSON {
    case null
    case bool(Bool)
    case number(String)
    case string(String)
    case array([JSON])
    case object([(String, JSON)])

    static func int(_ v: Int) -> JSON { .number(String(v)) }
    static func double(_ v: Double) -> JSON { .number("\(v)") }

    /// From a JSONSerialization object: keys sorted, so the result does not depend on hashing.
    static func from(_ any: Any) -> JSON {
        switch any {
        case is NSNull: return .null
        case let s as String: return .string(s)
        case let n as NSNumber:
            if String(cString: n.objCType) == "c", n == NSNumber(value: true) || n == NSNumber(value: false) { return .bool(n.boolValue) }
            let d = n.doubleValue
            if d == d.rounded(), abs(d) < 1e15 { return .number(String(n.int64Value)) }
            return .number("\(d)")
        case let a as [Any]: return .array(a.map(from))
        case let o as [String: Any]: return .object(o.keys.sorted().map { ($0, from(o[$0]!)) })
        default: return .string("\(any)")
        }
    }

    var text: String {
        var out = ""
        write(&out)
        return out
    }

    func write(_ out: inout String) {
        switch self {
        case .null: out += "null"
        case .bool(let b): out += b ? "true" : "false"
        case .number(let s): out += s
        case .string(let s): JSON.quote(s, &out)
        case .array(let items):
            out += "["
            for (i, v) in items.enumerated() {
                if i > 0 { out += "," }
                v.write(&out)
            }
            out += "]"
        case .object(let members):
            out += "{"
            for (i, (k, v)) in members.enumerated() {
                if i > 0 { out += "," }
                JSON.quote(k, &out)
                out += ":"
                v.write(&out)
            }
            out += "}"
        }
    }

    static func quote(_ s: String, _ out: inout String) {
        out += "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            default:
                if u.value < 0x20 {
                    let h = String(u.value, radix: 16)
                    out += "\\u" + String(repeating: "0", count: 4 - h.count) + h
                } else {
                    out.unicodeScalars.append(u)
                }
            }
        }
        out += "\""
    }

    subscript(key: String) -> JSON? {
        guard case .object(let m) = self else { return nil }
        return m.first { $0.0 == key }?.1
    }

    /// Mutates one node chosen by a random walk from the root: a number made interesting, a
    /// value's type changed, a member removed or duplicated, an array emptied or grown, a string
    /// made long or empty.
    mutating func mutate(_ r: inout FuzzRandom, depth: Int = 0) {
        // Walk down with some chance at each level.
        if depth < 8, r.chance(0.75) {
            switch self {
            case .object(var m) where !m.isEmpty:
                let i = r.below(m.count)
                m[i].1.mutate(&r, depth: depth + 1)
                self = .object(m)
                return
            case .array(var a) where !a.isEmpty:
                let i = r.below(a.count)
                a[i].mutate(&r, depth: depth + 1)
                self = .array(a)
                return
            default: break
            }
        }
        switch r.below(10) {
        case 0, 1, 2: self = .number(r.pick(Interesting.numbers))
        case 3: self = .string(r.pick(["64", "", "x", "true", "NaN", String(repeating: "a", count: 300)]))
        case 4: self = r.pick([.null, .bool(true), .bool(false), .array([]), .object([])])
        case 5:
            if case .object(var m) = self, !m.isEmpty { m.remove(at: r.below(m.count)); self = .object(m) }
        case 6:
            if case .object(var m) = self, !m.isEmpty { m.append(m[r.below(m.count)]); self = .object(m) }
            if case .array(var a) = self, !a.isEmpty { a.append(contentsOf: Array(repeating: a[r.below(a.count)], count: 1 + r.below(8))); self = .array(a) }
        case 7:
            if case .array(var a) = self, !a.isEmpty { a.removeLast(1 + r.below(a.count)); self = .array(a) }
        case 8:
            if case .array(let a) = self { self = .array(a.reversed()) }
            if case .object(let m) = self { self = .object(m.reversed()) }
        default:
            self = .array([self])
        }
    }
}
