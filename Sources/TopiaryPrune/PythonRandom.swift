/// CPython's `random` module, exactly: MT19937 seeded as `random.seed(int)` seeds it, and
/// `randint`/`randrange` through `_randbelow` (rejection sampling on `getrandbits`).
/// The reference pruning scripts draw calibration windows with it, so we do too.
public struct PythonRandom: Sendable {
    private var state = [UInt32](repeating: 0, count: 624)
    private var index = 625

    /// `random.seed(seed)` for a non-negative or negative integer seed (CPython uses |seed|).
    public init(seed: Int) {
        var n = seed.magnitude
        var key: [UInt32] = []
        repeat {
            key.append(UInt32(truncatingIfNeeded: n))
            n >>= 32
        } while n > 0
        initByArray(key)
    }

    private mutating func initGenrand(_ s: UInt32) {
        state[0] = s
        for i in 1..<624 {
            state[i] = 1_812_433_253 &* (state[i - 1] ^ (state[i - 1] >> 30)) &+ UInt32(i)
        }
        index = 624
    }

    private mutating func initByArray(_ key: [UInt32]) {
        initGenrand(19_650_218)
        var i = 1, j = 0
        for _ in 0..<max(624, key.count) {
            state[i] = (state[i] ^ ((state[i - 1] ^ (state[i - 1] >> 30)) &* 1_664_525)) &+ key[j] &+ UInt32(j)
            i += 1; j += 1
            if i >= 624 { state[0] = state[623]; i = 1 }
            if j >= key.count { j = 0 }
        }
        for _ in 0..<623 {
            state[i] = (state[i] ^ ((state[i - 1] ^ (state[i - 1] >> 30)) &* 1_566_083_941)) &- UInt32(i)
            i += 1
            if i >= 624 { state[0] = state[623]; i = 1 }
        }
        state[0] = 0x8000_0000
    }

    /// The next 32-bit output of MT19937.
    public mutating func nextUInt32() -> UInt32 {
        if index >= 624 { twist() }
        var y = state[index]
        index += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C_5680
        y ^= (y << 15) & 0xEFC6_0000
        y ^= y >> 18
        return y
    }

    private mutating func twist() {
        for i in 0..<624 {
            let y = (state[i] & 0x8000_0000) | (state[(i + 1) % 624] & 0x7FFF_FFFF)
            var v = state[(i + 397) % 624] ^ (y >> 1)
            if y & 1 != 0 { v ^= 0x9908_B0DF }
            state[i] = v
        }
        index = 0
    }

    /// `random.getrandbits(k)` for 1 <= k <= 64: 32-bit words from least significant up, the last one shifted.
    public mutating func getrandbits(_ k: Int) -> UInt64 {
        precondition(k >= 1 && k <= 64)
        if k <= 32 { return UInt64(nextUInt32() >> (32 - k)) }
        let low = UInt64(nextUInt32())
        let high = UInt64(nextUInt32() >> (64 - k))
        return low | (high << 32)
    }

    /// `random._randbelow(n)`: uniform in 0..<n by rejection.
    public mutating func randbelow(_ n: Int) -> Int {
        precondition(n > 0)
        let k = Int.bitWidth - n.leadingZeroBitCount
        var r = getrandbits(k)
        while r >= UInt64(n) { r = getrandbits(k) }
        return Int(r)
    }

    /// `random.randint(a, b)`: uniform in a...b.
    public mutating func randint(_ a: Int, _ b: Int) -> Int {
        precondition(b >= a)
        return a + randbelow(b - a + 1)
    }
}
