import CTopiaryKernels

/// Conversions between Float32 and the 16-bit formats found in checkpoints.
/// Done on bit patterns so that results do not depend on the platform's Float16 support.
public enum HalfPrecision {
    /// IEEE 754 binary16 bits -> Float.
    @inlinable
    public static func fp16ToFloat(_ h: UInt16) -> Float {
        let sign = UInt32(h & 0x8000) << 16
        let exponent = UInt32(h >> 10) & 0x1F
        let mantissa = UInt32(h & 0x03FF)
        if exponent == 0 {
            if mantissa == 0 { return Float(bitPattern: sign) }
            // Subnormal: value = mantissa * 2^-24.
            let v = Float(mantissa) * 5.9604645e-08
            return sign != 0 ? -v : v
        }
        if exponent == 0x1F {
            return Float(bitPattern: sign | 0x7F80_0000 | (mantissa << 13))
        }
        return Float(bitPattern: sign | ((exponent + 112) << 23) | (mantissa << 13))
    }

    /// Float -> IEEE 754 binary16 bits, round to nearest even.
    @inlinable
    public static func floatToFP16(_ f: Float) -> UInt16 {
        let bits = f.bitPattern
        let sign = UInt16((bits >> 16) & 0x8000)
        let exponent = Int((bits >> 23) & 0xFF)
        var mantissa = bits & 0x007F_FFFF
        if exponent == 0xFF {  // Inf or NaN
            return sign | 0x7C00 | (mantissa != 0 ? 0x0200 : 0)
        }
        let e = exponent - 127 + 15
        if e >= 0x1F { return sign | 0x7C00 }  // overflow -> Inf
        if e <= 0 {
            // Subnormal half (or zero).
            if e < -10 { return sign }
            mantissa |= 0x0080_0000
            let shift = UInt32(14 - e)
            var half = mantissa >> shift
            let rem = mantissa & ((1 << shift) - 1)
            let halfway = UInt32(1) << (shift - 1)
            if rem > halfway || (rem == halfway && (half & 1) == 1) { half += 1 }
            return sign | UInt16(half)
        }
        var half = UInt32(e << 10) | (mantissa >> 13)
        let rem = mantissa & 0x1FFF
        if rem > 0x1000 || (rem == 0x1000 && (half & 1) == 1) { half += 1 }
        return sign | UInt16(truncatingIfNeeded: half)
    }

    /// bfloat16 bits -> Float (exact).
    @inlinable
    public static func bf16ToFloat(_ b: UInt16) -> Float {
        Float(bitPattern: UInt32(b) << 16)
    }

    /// Float -> bfloat16 bits, round to nearest even (NaN kept quiet).
    @inlinable
    public static func floatToBF16(_ f: Float) -> UInt16 {
        let bits = f.bitPattern
        if f.isNaN { return UInt16(bits >> 16) | 0x0040 }
        let rounding = UInt32(0x7FFF) + ((bits >> 16) & 1)
        return UInt16((bits &+ rounding) >> 16)
    }

    /// `floatToBF16` of `count` values, stored little-endian from `destination` (which need not be
    /// aligned), in vectors: writing a 7B model's 13 GB of bf16 spent a fifth of its time in the
    /// element-by-element loop.
    public static func floatsToBF16(_ source: UnsafePointer<Float>, count: Int, into destination: UnsafeMutableRawPointer) {
        topiary_f32_to_bf16(source, destination, count)
    }

    /// `floatToFP16` of `count` values, stored little-endian from `destination` (which need not be
    /// aligned), in vectors.
    public static func floatsToFP16(_ source: UnsafePointer<Float>, count: Int, into destination: UnsafeMutableRawPointer) {
        topiary_f32_to_f16(source, destination, count)
    }
}
