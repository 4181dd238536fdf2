/// The character classes of the Digits and WhitespaceSplit pre-tokenizers, Strip and added tokens, as bit flags.
enum CharClass {
    /// \p{L}: general categories Lu, Ll, Lt, Lm, Lo.
    static let letter: UInt8 = 1
    /// \p{N}: general categories Nd, Nl, No.
    static let number: UInt8 = 2
    /// \s: the Unicode White_Space property.
    static let space: UInt8 = 4

    @inline(__always) static func of(_ v: UInt32) -> UInt8 {
        if v < 0x80 {
            switch v {
            case 0x61...0x7A, 0x41...0x5A: return letter
            case 0x30...0x39: return number
            case 0x09...0x0D, 0x20: return space
            default: return 0
            }
        }
        return nonASCII(v)
    }

    private static func nonASCII(_ v: UInt32) -> UInt8 {
        guard let scalar = Unicode.Scalar(v) else { return 0 }
        let p = scalar.properties
        switch p.generalCategory {
        case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter: return letter
        case .decimalNumber, .letterNumber, .otherNumber: return number
        default: return p.isWhitespace ? space : 0
        }
    }

    /// Classes of every scalar of a buffer, computed once so the splitters only compare bytes.
    static func classify(_ scalars: UnsafeBufferPointer<UInt32>) -> [UInt8] {
        [UInt8](unsafeUninitializedCapacity: scalars.count) { out, count in
            for i in scalars.indices { out[i] = of(scalars[i]) }
            count = scalars.count
        }
    }
}

/// GPT-2's reversible byte ↔ character map: printable Latin-1 bytes stand for themselves, the other 68 bytes
/// (controls, space, DEL, NBSP, soft hyphen) are moved to U+0100… in byte order, so every byte is a visible character.
enum ByteLevelMap {
    static let byteToScalar: [UInt32] = {
        var table = [UInt32](repeating: 0, count: 256)
        var shifted: UInt32 = 0
        for b in 0..<256 {
            if (0x21...0x7E).contains(b) || (0xA1...0xAC).contains(b) || (0xAE...0xFF).contains(b) {
                table[b] = UInt32(b)
            } else {
                table[b] = 256 + shifted
                shifted += 1
            }
        }
        return table
    }()

    /// Inverse map, indexed by scalar value (all mapped scalars are below 0x144); -1 where none.
    static let scalarToByte: [Int16] = {
        var table = [Int16](repeating: -1, count: 0x144)
        for (b, s) in byteToScalar.enumerated() { table[Int(s)] = Int16(b) }
        return table
    }()

    /// Decodes a byte-level token string to its bytes; nil if a character is outside the map.
    static func bytes(of token: String, into out: inout [UInt8]) -> Bool {
        let start = out.count
        for s in token.unicodeScalars {
            let v = Int(s.value)
            guard v < scalarToByte.count, scalarToByte[v] >= 0 else {
                out.removeLast(out.count - start)
                return false
            }
            out.append(UInt8(scalarToByte[v]))
        }
        return true
    }

    static func encode(_ bytes: some Sequence<UInt8>) -> String {
        var s = String.UnicodeScalarView()
        for b in bytes { s.append(Unicode.Scalar(byteToScalar[Int(b)])!) }
        return String(s)
    }
}

extension Array where Element == UInt32 {
    /// The scalars of a string, as raw values (the form every encoder works on).
    init(scalarsOf text: some StringProtocol) {
        // Native strings hold valid UTF-8, so their bytes decode directly (much faster than iterating
        // unicodeScalars); other strings (bridged ones) take the general path.
        let decoded: [UInt32]? = text.utf8.withContiguousStorageIfAvailable { u in
            [UInt32](unsafeUninitializedCapacity: u.count) { out, count in
                var i = 0, o = 0
                let n = u.count
                while i < n {
                    let b0 = UInt32(u[i])
                    if b0 < 0x80 {
                        out[o] = b0
                        i += 1
                    } else if b0 < 0xE0 {
                        out[o] = (b0 & 0x1F) << 6 | UInt32(u[i + 1] & 0x3F)
                        i += 2
                    } else if b0 < 0xF0 {
                        out[o] = (b0 & 0x0F) << 12 | UInt32(u[i + 1] & 0x3F) << 6 | UInt32(u[i + 2] & 0x3F)
                        i += 3
                    } else {
                        out[o] = (b0 & 0x07) << 18 | UInt32(u[i + 1] & 0x3F) << 12 | UInt32(u[i + 2] & 0x3F) << 6
                            | UInt32(u[i + 3] & 0x3F)
                        i += 4
                    }
                    o += 1
                }
                count = o
            }
        }
        if let decoded {
            self = decoded
            return
        }
        self.init()
        reserveCapacity(text.utf8.count)
        for s in text.unicodeScalars { append(s.value) }
    }

    var asString: String {
        var view = String.UnicodeScalarView()
        for v in self { if let s = Unicode.Scalar(v) { view.append(s) } }
        return String(view)
    }
}

/// Appends the UTF-8 bytes of one scalar value.
@inline(__always) func appendUTF8(_ v: UInt32, to out: inout [UInt8]) {
    switch v {
    case 0..<0x80:
        out.append(UInt8(v))
    case 0x80..<0x800:
        out.append(UInt8(0xC0 | (v >> 6)))
        out.append(UInt8(0x80 | (v & 0x3F)))
    case 0x800..<0x10000:
        out.append(UInt8(0xE0 | (v >> 12)))
        out.append(UInt8(0x80 | ((v >> 6) & 0x3F)))
        out.append(UInt8(0x80 | (v & 0x3F)))
    default:
        out.append(UInt8(0xF0 | (v >> 18)))
        out.append(UInt8(0x80 | ((v >> 12) & 0x3F)))
        out.append(UInt8(0x80 | ((v >> 6) & 0x3F)))
        out.append(UInt8(0x80 | (v & 0x3F)))
    }
}
