import XCTest
import CTopiarySupport
import TopiaryTensor
@testable import TopiaryCluster

final class WireCodecTests: XCTestCase {
    static let samples: [Message] = [
        .hello(minVersion: 1, maxVersion: 1, role: 1, nonce: Array(repeating: 7, count: 32), name: "worker-0"),
        .challenge(version: 1, nonce: Array(0..<32), mac: Array(repeating: 0xAB, count: 32)),
        .proof(mac: Array(32..<64)),
        .welcome(name: "coordinator ✓"),
        .error(code: 401, message: "authentication failed"),
        .heartbeat(sequence: .max),
        .tensorHeader(stream: 9, name: "model.layers.0.mlp.up_proj.weight", dtype: .bf16, shape: [3, 5], byteCount: 30),
        .tensorChunk(stream: 9, offset: 16, bytes: Array(0..<14)),
        .tensorChunk(stream: 1, offset: 0, bytes: []),
        .assign(job: Array("{\"first\":0}".utf8), tensors: 64),
        .blockResult(block: 3, tensors: 9, report: Array("{}".utf8)),
        .rangeDone(tensors: 32),
        .shutdown,
        .peerJoin(group: "4242-1-0", rank: 2),
        .replica(block: 3, kind: 1, name: "model.layers.3.self_attn.q_proj", index: 7, form: 1, bytes: []),
        .replica(block: 3, kind: 5, name: "", index: 1, form: 2, bytes: [1, 2, 3, 4, 5, 6, 7, 8]),
    ]

    func testCRC32CKnownVectors() {
        XCTAssertEqual(CRC32C.checksum(Array("123456789".utf8)), 0xE306_9283)
        XCTAssertEqual(CRC32C.checksum([UInt8](repeating: 0, count: 32)), 0x8A91_36AA)
        XCTAssertEqual(CRC32C.checksum([]), 0)
        // Continuation over pieces equals one pass.
        let data = (0..<1000).map { UInt8(truncatingIfNeeded: $0 * 31) }
        let whole = CRC32C.checksum(data)
        let first = data[0..<333].withUnsafeBytes { CRC32C.checksum($0) }
        let both = data[333...].withUnsafeBytes { CRC32C.checksum($0, continuing: first) }
        XCTAssertEqual(both, whole)
    }

    /// The three-lane hardware path (lanes of 8 KiB joined by a shift operator) against the
    /// one-byte-at-a-time table, on lengths around the lane boundaries and odd offsets.
    func testCRC32CHardwareLanesMatchTheTable() {
        var rng = SystemRandomNumberGenerator()
        let data = (0..<(3 * 8192 * 3 + 77)).map { _ in UInt8.random(in: 0...255, using: &rng) }
        data.withUnsafeBytes { raw in
            for length in [0, 1, 7, 8, 8191, 3 * 8192 - 1, 3 * 8192, 3 * 8192 + 1, 3 * 8192 + 9, 6 * 8192 + 5, raw.count - 3] {
                for offset in [0, 3] where offset + length <= raw.count {
                    let p = raw.baseAddress! + offset
                    XCTAssertEqual(topiary_crc32c(0x1234_5678, p, length), topiary_crc32c_portable(0x1234_5678, p, length), "length \(length) offset \(offset)")
                }
            }
        }
    }

    func testEveryMessageRoundTrips() throws {
        for m in Self.samples {
            var decoder = FrameDecoder()
            decoder.append(m.frame().encoded())
            let frame = try XCTUnwrap(try decoder.next(), "\(m.type)")
            XCTAssertEqual(try Message.decode(frame), m)
            XCTAssertEqual(decoder.bufferedBytes, 0)
        }
        XCTAssertEqual(Set(Self.samples.map(\.type)), Set(MessageType.allCases))
    }

    func testFramesSplitAtEveryByteBoundaryStillDecode() throws {
        let bytes = Self.samples.flatMap { $0.frame().encoded() }
        var decoder = FrameDecoder()
        var decoded: [Message] = []
        for b in bytes {
            decoder.append([b])
            while let f = try decoder.next() { decoded.append(try Message.decode(f)) }
        }
        XCTAssertEqual(decoded, Self.samples)
    }

    func expect(_ bytes: [UInt8], maxFrameBytes: Int = Protocol.defaultMaxFrameBytes, _ check: (WireError) -> Bool,
                file: StaticString = #filePath, line: UInt = #line) {
        var decoder = FrameDecoder(maxFrameBytes: maxFrameBytes)
        decoder.append(bytes)
        do {
            if let f = try decoder.next() { _ = try Message.decode(f) }
            XCTFail("expected an error", file: file, line: line)
        } catch let e as WireError {
            XCTAssertTrue(check(e), "unexpected: \(e)", file: file, line: line)
            XCTAssertFalse(e.description.isEmpty)
        } catch { XCTFail("\(error)", file: file, line: line) }
    }

    func testBadFramesAreRefusedWithClearErrors() throws {
        let good = Message.heartbeat(sequence: 5).frame().encoded()
        var badMagic = good; badMagic[0] = 0x58
        expect(badMagic) { if case .badMagic = $0 { return true }; return false }
        var badVersion = good; badVersion[4] = 9
        expect(badVersion) { $0 == .unsupportedVersion(found: 9, supported: 3...3) }
        // A version-1 peer (before the statistics chain's kinds 15 and 16) and a version-2 one
        // (whole-width strips of H on the chain) are refused, not misread.
        for old: UInt8 in [1, 2] {
            var oldVersion = good; oldVersion[4] = old; oldVersion[5] = 0
            expect(oldVersion) { $0 == .unsupportedVersion(found: UInt16(old), supported: 3...3) }
        }
        var badType = good; badType[6] = 0xEE; badType[7] = 0x03
        expect(badType) { $0 == .unknownMessageType(1006) }
        var badCRC = good; badCRC[good.count - 1] ^= 0x01
        expect(badCRC) { if case .badChecksum(let t, _, _) = $0 { return t == 6 }; return false }
        let big = Message.tensorChunk(stream: 1, offset: 0, bytes: Array(repeating: 1, count: 2000)).frame().encoded()
        expect(big, maxFrameBytes: 1000) { $0 == .frameTooLarge(type: 21, length: 2012, limit: 1000) }
        // Oversize is refused from the header alone, before the payload arrives.
        expect(Array(big.prefix(FrameHeader.size)), maxFrameBytes: 1000) { if case .frameTooLarge = $0 { return true }; return false }
        // A payload shorter than its message needs.
        var short = Frame(type: .heartbeat, payload: [1, 2, 3]).encoded()
        expect(short) { if case .truncated(let what, 8, 3) = $0 { return what.contains("sequence") }; return false }
        // Trailing bytes.
        short = Frame(type: .heartbeat, payload: Array(repeating: 0, count: 9)).encoded()
        expect(short) { if case .malformed(_, "payload", _) = $0 { return true }; return false }
        // Bad field values.
        let badDType = Frame(type: .tensorHeader, payload: {
            var w = ByteWriter(); w.u32(1); w.string("x"); w.u8(7); w.u8(1); w.u64(4); w.u64(16); return w.data }()).encoded()
        expect(badDType) { if case .malformed("tensor-header", "dtype", _) = $0 { return true }; return false }
        let badCount = Message.tensorHeader(stream: 1, name: "x", dtype: .f32, shape: [4], byteCount: 17).frame().encoded()
        expect(badCount) { if case .malformed("tensor-header", "byte_count", _) = $0 { return true }; return false }
    }

    func testTruncatedFrameWaitsForMoreBytesAndNeverHangs() throws {
        let bytes = Message.welcome(name: "w").frame().encoded()
        for cut in 0..<bytes.count {
            var decoder = FrameDecoder()
            decoder.append(Array(bytes.prefix(cut)))
            XCTAssertNil(try decoder.next())
            XCTAssertGreaterThan(decoder.bytesWanted, 0)
        }
    }

    /// 10,000 random byte strings: errors or "need more bytes", never a crash or a hang.
    func testRandomBytesNeverCrashTheDecoder() {
        var state: UInt64 = 0x1234_5678
        func next() -> UInt64 {
            state = state &* 6364136223846793005 &+ 1442695040888963407
            return state >> 33
        }
        var errors = 0
        for i in 0..<10_000 {
            let n = Int(next() % 200)
            var bytes = (0..<n).map { _ in UInt8(truncatingIfNeeded: next()) }
            // Half of them start with a valid magic and version so later checks are reached too.
            if i % 2 == 0 && n >= 8 { bytes.replaceSubrange(0..<6, with: FrameHeader.magic + [1, 0]) }
            if i % 4 == 0 && n >= 8 { bytes[6] = UInt8(next() % 34); bytes[7] = 0 }
            var decoder = FrameDecoder(maxFrameBytes: 1 << 16)
            decoder.append(bytes)
            do {
                while let f = try decoder.next() { _ = try Message.decode(f) }
            } catch is WireError {
                errors += 1
            } catch {
                XCTFail("non-wire error \(error)")
            }
        }
        XCTAssertGreaterThan(errors, 5000)
    }

    func testTensorsStreamInChunksAndReassemble() throws {
        var rng: UInt64 = 3
        let m = Matrix(rows: 37, cols: 29) { p in
            for i in p.indices { rng = rng &* 6364136223846793005 &+ 1; p[i] = Float(Int64(bitPattern: rng >> 20) % 10_000) / 997 }
        }
        for dtype in WireDType.allCases {
            let messages = TensorStream.messages(m, name: "h", dtype: dtype, stream: 4, chunkBytes: 100)
            XCTAssertGreaterThan(messages.count, 10)
            var decoder = FrameDecoder(maxFrameBytes: 200)
            for msg in messages { decoder.append(msg.frame().encoded()) }
            var assembler = try TensorAssembler(header: try Message.decode(try XCTUnwrap(try decoder.next())))
            while let f = try decoder.next() { try assembler.add(try Message.decode(f)) }
            let back = try assembler.matrix()
            switch dtype {
            case .f32: XCTAssertEqual(back, m)
            case .f16, .bf16: XCTAssertLessThan(back.maxAbsDifference(m), dtype == .f16 ? 0.01 : 0.1)
            }
        }
        // Out-of-order, foreign and oversized chunks are refused; a short tensor is incomplete.
        let messages = TensorStream.messages(m, name: "h", stream: 4, chunkBytes: 400)
        var a = try TensorAssembler(header: messages[0])
        XCTAssertThrowsError(try a.add(messages[2]))
        var b = try TensorAssembler(header: messages[0])
        XCTAssertThrowsError(try b.add(.tensorChunk(stream: 5, offset: 0, bytes: [0, 0, 0, 0])))
        var c = try TensorAssembler(header: messages[0])
        XCTAssertThrowsError(try c.add(.tensorChunk(stream: 4, offset: 0, bytes: Array(repeating: 0, count: 37 * 29 * 4 + 4))))
        var d = try TensorAssembler(header: messages[0])
        try d.add(messages[1])
        XCTAssertThrowsError(try d.matrix())
    }

    /// A tensor header is a claim: the assembler reserves at most its initial capacity before
    /// bytes arrive, then grows with them (at most twice what arrived), and ends exact.
    func testTensorStorageFollowsTheBytesThatArriveNotTheHeader() throws {
        // 2^30 floats announced (4 GiB, within the default limit); 64 KiB arrive.
        let header = Message.tensorHeader(stream: 1, name: "inputs/0", dtype: .f32, shape: [1 << 15, 1 << 15], byteCount: 1 << 32)
        var a = try TensorAssembler(header: header)
        XCTAssertEqual(a.reservedBytes, TensorAssembler.initialCapacityBytes)
        try a.add(.tensorChunk(stream: 1, offset: 0, bytes: Array(repeating: 0, count: 1 << 16)))
        XCTAssertEqual(a.reservedBytes, TensorAssembler.initialCapacityBytes)
        XCTAssertThrowsError(try a.matrix()) { e in
            XCTAssertEqual(e as? WireError, .truncated(what: "tensor 'inputs/0'", needed: 1 << 32, available: 1 << 16))
        }
        // A small tensor reserves only itself.
        XCTAssertEqual(try TensorAssembler(header: .tensorHeader(stream: 0, name: "v", dtype: .bf16, shape: [3], byteCount: 6)).reservedBytes, 12)

        // Larger than the initial capacity, in 1 MiB chunks (f32 read in place, and bf16): the
        // storage stays within twice what arrived and the tensor is exact.
        let elements = TensorAssembler.initialCapacityBytes / 4 * 5 / 2
        // Integers of at most 8 significant bits: exact in bf16 too.
        let m = Matrix(rows: 5, cols: elements / 5) { p in for i in p.indices { p[i] = Float(i % 256) - 128 } }
        for dtype in [WireDType.f32, .bf16] {
            let messages = TensorStream.messages(m, name: "big", dtype: dtype, stream: 2, chunkBytes: 1 << 20)
            var b = try TensorAssembler(header: messages[0])
            var arrived = 0
            for case .tensorChunk(let stream, let offset, let bytes) in messages.dropFirst() {
                if dtype == .f32 {
                    _ = try b.receiveInPlace(stream: stream, offset: offset, byteCount: bytes.count, prefixChecksum: 0) { region in
                        bytes.withUnsafeBytes { region.copyMemory(from: $0) }
                    }
                } else {
                    try b.add(.tensorChunk(stream: stream, offset: offset, bytes: bytes))
                }
                arrived += bytes.count / dtype.size
                XCTAssertLessThanOrEqual(b.reservedBytes, max(TensorAssembler.initialCapacityBytes, 2 * arrived * 4), "\(dtype) after \(arrived) elements")
            }
            XCTAssertEqual(b.reservedBytes, elements * 4)
            XCTAssertEqual(try b.matrix(), m, "\(dtype)")
        }
    }

    /// A header over the receiver's bound, or one whose byte count disagrees with its shape, is
    /// refused naming the field and what was expected.
    func testTensorHeadersOverTheBoundAreRefusedNamingIt() throws {
        XCTAssertThrowsError(try TensorAssembler(header: .tensorHeader(stream: 0, name: "w", dtype: .bf16, shape: [1024, 512], byteCount: 1 << 20),
                                                 maxBytes: 1 << 20)) { e in
            XCTAssertEqual("\(e)", "tensor-header message: field 'shape' [1024, 512] of 'w' needs 2097152 bytes as f32, over the limit of 1048576 bytes")
        }
        XCTAssertNoThrow(try TensorAssembler(header: .tensorHeader(stream: 0, name: "w", dtype: .bf16, shape: [512, 512], byteCount: 1 << 19),
                                             maxBytes: 1 << 20))
        XCTAssertThrowsError(try TensorAssembler(header: .tensorHeader(stream: 0, name: "w", dtype: .f32, shape: [4, 4], byteCount: 60))) { e in
            XCTAssertEqual("\(e)", "tensor-header message: field 'byte_count' is 60, expected 64 for shape [4, 4] of f32")
        }
        XCTAssertThrowsError(try TensorAssembler(header: .tensorHeader(stream: 0, name: "w", dtype: .f32, shape: [1 << 40, 1 << 40], byteCount: 0))) { e in
            XCTAssertEqual("\(e)", "tensor-header message: field 'shape' [1099511627776, 1099511627776] of 'w' has more elements than a 64-bit count holds")
        }
        XCTAssertThrowsError(try TensorAssembler(header: .tensorHeader(stream: 0, name: "w", dtype: .f32, shape: [2, -2], byteCount: 16))) { e in
            XCTAssertEqual("\(e)", "tensor-header message: field 'shape[1]' is -2 in [2, -2] of 'w', expected 0 or more")
        }
    }
}

final class HandshakeTests: XCTestCase {
    let secret = try! SharedSecret(bytes: Array("correct horse battery staple 42".utf8))

    /// Runs both sides through encoded frames, as they would travel.
    func handshake(listener: inout ListenerHandshake, connector: inout ConnectorHandshake) throws {
        var toListener = [connector.start()]
        while !toListener.isEmpty {
            var toConnector: [Message] = []
            for m in toListener {
                var d = FrameDecoder(maxFrameBytes: Protocol.maxHandshakeFrameBytes)
                d.allowedTypes = listener.expected
                d.append(m.frame().encoded())
                toConnector += try listener.receive(try Message.decode(try XCTUnwrap(try d.next())))
            }
            toListener = []
            for m in toConnector { toListener += try connector.receive(m) }
        }
    }

    func testMutualAuthenticationSucceedsWithTheSameSecret() throws {
        var l = ListenerHandshake(secret: secret, name: "worker-1")
        var c = ConnectorHandshake(secret: secret, name: "coordinator", role: 0)
        try handshake(listener: &l, connector: &c)
        XCTAssertEqual(l.state, .authenticated)
        XCTAssertEqual(c.state, .authenticated)
        XCTAssertEqual(c.peerName, "worker-1")
        XCTAssertEqual(l.peerName, "coordinator")
    }

    func testWrongSecretsAreRefusedOnBothSides() throws {
        let other = try SharedSecret(bytes: Array("a different secret, 32 bytes ok".utf8))
        var l = ListenerHandshake(secret: secret, name: "w")
        var c = ConnectorHandshake(secret: other, name: "c", role: 0)
        // The connector detects that the listener does not share its secret.
        XCTAssertThrowsError(try handshake(listener: &l, connector: &c)) { e in
            XCTAssertEqual(e as? WireError, .authenticationFailed("the listener did not prove knowledge of the shared secret"))
        }
        // A connector that skips the check and sends a forged proof is refused by the listener.
        var l2 = ListenerHandshake(secret: secret, name: "w")
        var c2 = ConnectorHandshake(secret: other, name: "c", role: 0)
        _ = try l2.receive(c2.start())
        XCTAssertThrowsError(try l2.receive(.proof(mac: Array(repeating: 0, count: 32))))
        XCTAssertEqual(l2.state, .failed)
    }

    /// Before authentication, anything but the next handshake message is refused at its frame
    /// header: no payload of it is read.
    func testUnauthenticatedPeerCannotSendOtherMessages() throws {
        var l = ListenerHandshake(secret: secret, name: "w")
        var d = FrameDecoder(maxFrameBytes: Protocol.maxHandshakeFrameBytes)
        d.allowedTypes = l.expected
        let chunk = Message.tensorChunk(stream: 1, offset: 0, bytes: Array(repeating: 0, count: 100)).frame().encoded()
        d.append(Array(chunk.prefix(FrameHeader.size)))
        XCTAssertThrowsError(try d.next()) { e in
            XCTAssertEqual(e as? WireError, .unexpectedMessage(expected: "hello", found: "tensor-chunk"))
        }
        // A big frame is refused from its header too.
        var d2 = FrameDecoder(maxFrameBytes: Protocol.maxHandshakeFrameBytes)
        d2.allowedTypes = l.expected
        d2.append(FrameHeader(version: 1, type: MessageType.hello.rawValue, flags: 0, length: 1 << 30, checksum: 0).encoded())
        XCTAssertThrowsError(try d2.next())
        XCTAssertThrowsError(try l.receive(.heartbeat(sequence: 1)))
        XCTAssertThrowsError(try SharedSecret(bytes: Array("short".utf8)))
    }
}
