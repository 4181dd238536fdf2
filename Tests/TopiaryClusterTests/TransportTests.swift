import Foundation
import XCTest
import TopiaryTensor
@testable import TopiaryCluster

/// Frames over real TCP sockets on loopback.
final class TransportTests: XCTestCase {
    let secret = try! SharedSecret(bytes: Array("loopback test secret, long enough".utf8))

    func testEndpointParsing() throws {
        XCTAssertEqual(try Endpoint(parsing: "node01:7000"), Endpoint(host: "node01", port: 7000))
        XCTAssertEqual(try Endpoint(parsing: "[::1]:9"), Endpoint(host: "::1", port: 9))
        XCTAssertEqual(try Endpoint(parsing: "127.0.0.2:0").isLoopback, true)
        for bad in ["node01", "node01:", ":80", "host:70000", "host:x"] {
            XCTAssertThrowsError(try Endpoint(parsing: bad), bad)
        }
    }

    /// A worker-like echo server: authenticate, then return every tensor it receives.
    func startEchoServer(_ listener: Listener, connections: Int) -> DispatchGroup {
        let group = DispatchGroup()
        let secret = self.secret
        DispatchQueue.global().async(group: group) {
            for _ in 0..<connections {
                guard let c = try? listener.accept(timeout: 20) else { return }
                do {
                    _ = try c.acceptHandshake(secret: secret, name: "echo")
                    while true {
                        let (name, m) = try c.receiveTensor()
                        try c.sendTensor(m, name: name, stream: 2, chunkBytes: 1 << 20)
                    }
                } catch {
                    c.close()
                }
            }
        }
        return group
    }

    func testAuthenticatedTensorRoundTripOverLoopback() throws {
        let listener = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        XCTAssertGreaterThan(listener.endpoint.port, 0)
        let server = startEchoServer(listener, connections: 1)
        let c = try Connection.connect(to: listener.endpoint)
        XCTAssertEqual(try c.authenticate(secret: secret, name: "coordinator", role: 0), "echo")
        // 12 MB of activations in 1 MiB chunks.
        let m = Matrix(rows: 2048, cols: 1536) { p in for i in p.indices { p[i] = Float(i % 977) * 0.25 } }
        try c.sendTensor(m, name: "activations/0", stream: 1, chunkBytes: 1 << 20)
        let (name, back) = try c.receiveTensor()
        XCTAssertEqual(name, "activations/0")
        XCTAssertEqual(back, m)
        c.close()
        XCTAssertEqual(server.wait(timeout: .now() + 20), .success)
    }

    func testWrongSecretIsRefusedAndTheServerKeepsServing() throws {
        let listener = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        let server = startEchoServer(listener, connections: 3)
        // 1. A wrong secret.
        let wrong = try Connection.connect(to: listener.endpoint)
        XCTAssertThrowsError(try wrong.authenticate(secret: SharedSecret(bytes: Array("not the right secret at all!!".utf8)), name: "x", role: 0)) { e in
            XCTAssertTrue("\(e)".contains("did not prove"), "\(e)")
        }
        wrong.close()
        // 2. Garbage bytes instead of a hello.
        let garbage = try Connection.connect(to: listener.endpoint)
        try garbage.sendBytes(Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8))
        // The server answers with an error naming the bad field and closes.
        guard case .error(401, let text) = try garbage.receive() else { return XCTFail("expected an error message") }
        XCTAssertTrue(text.contains("magic"), text)
        XCTAssertThrowsError(try garbage.receive())
        garbage.close()
        // 3. The server still serves a good client.
        let good = try Connection.connect(to: listener.endpoint)
        _ = try good.authenticate(secret: secret, name: "c", role: 0)
        let m = Matrix(rows: 3, cols: 4, values: Array(0..<12).map(Float.init))
        try good.sendTensor(m, name: "t", stream: 7)
        XCTAssertEqual(try good.receiveTensor().matrix, m)
        good.close()
        XCTAssertEqual(server.wait(timeout: .now() + 20), .success)
    }

    /// f16 and bf16 tensors over a socket, in several chunks, decode to the rounded values.
    func testHalfPrecisionTensorsOverLoopback() throws {
        let listener = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        let m = Matrix(rows: 40, cols: 30, values: (0..<1200).map { Float($0) * 0.37 - 200 })
        let sender = DispatchGroup()
        DispatchQueue.global().async(group: sender) {
            if let c = try? listener.accept(timeout: 20) {
                try? c.sendTensor(m, name: "h", stream: 1, dtype: .f16, chunkBytes: 256)
                try? c.sendTensor(m, name: "b", stream: 2, dtype: .bf16, chunkBytes: 256)
                usleep(200_000)
                c.close()
            }
        }
        let c = try Connection.connect(to: listener.endpoint)
        let h = try c.receiveTensor(), b = try c.receiveTensor()
        XCTAssertEqual(h.matrix, try { var a = try TensorAssembler(header: TensorStream.messages(m, name: "h", dtype: .f16, stream: 1)[0]); for msg in TensorStream.messages(m, name: "h", dtype: .f16, stream: 1).dropFirst() { try a.add(msg) }; return try a.matrix() }())
        XCTAssertLessThan(h.matrix.maxAbsDifference(m), 0.1)
        XCTAssertLessThan(b.matrix.maxAbsDifference(m), 1.0)
        XCTAssertEqual(sender.wait(timeout: .now() + 20), .success)
    }

    /// The socket's streaming send writes exactly the frames `TensorStream.messages` builds (the
    /// ones the wire tests and fuzz targets decode), for every dtype, a chunk size that does not
    /// divide the tensor, and an empty tensor.
    func testSocketSendIsTensorStreamBytes() throws {
        let listener = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        let m = Matrix(rows: 7, cols: 13, values: (0..<91).map { Float($0) * 0.37 - 11 })
        let empty = Matrix(rows: 0, cols: 5)
        let cases: [(Matrix, WireDType, Int)] = [(m, .f32, 40), (m, .f16, 30), (m, .bf16, 64), (m, .f32, 1 << 20), (empty, .f32, 16), (empty, .f16, 16)]
        let expected = cases.enumerated().map { k, c in
            TensorStream.messages(c.0, name: "t\(k)", dtype: c.1, stream: UInt32(k), chunkBytes: c.2).flatMap { $0.frame().encoded() }
        }
        let sender = DispatchGroup()
        DispatchQueue.global().async(group: sender) {
            guard let c = try? listener.accept(timeout: 20) else { return }
            for (k, c0) in cases.enumerated() { try? c.sendTensor(c0.0, name: "t\(k)", stream: UInt32(k), dtype: c0.1, chunkBytes: c0.2) }
            usleep(200_000)
            c.close()
        }
        let c = try Connection.connect(to: listener.endpoint)
        for (k, bytes) in expected.enumerated() {
            XCTAssertGreaterThan(bytes.count, 0)
            var received = [UInt8](repeating: 0, count: bytes.count)
            try c.receiveRawForBenchmark(into: &received)
            XCTAssertEqual(received, bytes, "case \(k)")
        }
        XCTAssertEqual(sender.wait(timeout: .now() + 20), .success)
    }

    /// A corrupted byte inside a tensor chunk is caught by the CRC on the in-place receive path.
    func testCorruptedTensorChunkIsRefused() throws {
        let listener = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        let m = Matrix(rows: 16, cols: 16, values: (0..<256).map(Float.init))
        var bytes = TensorStream.messages(m, name: "t", stream: 1, chunkBytes: 512).flatMap { $0.frame().encoded() }
        bytes[bytes.count - 100] ^= 0x40
        let corrupted = bytes
        let sender = DispatchGroup()
        DispatchQueue.global().async(group: sender) {
            if let c = try? listener.accept(timeout: 20) { try? c.sendRawForBenchmark(corrupted); usleep(200_000); c.close() }
        }
        let c = try Connection.connect(to: listener.endpoint)
        XCTAssertThrowsError(try c.receiveTensor()) { e in
            guard case .badChecksum(21, _, _) = e as? WireError else { return XCTFail("\(e)") }
        }
        XCTAssertEqual(sender.wait(timeout: .now() + 20), .success)
    }

    func testConnectingToAClosedPortFailsClearly() throws {
        let listener = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        let endpoint = listener.endpoint
        _ = listener  // keep the port ours, but connect to the next one, which nothing serves
        XCTAssertThrowsError(try Connection.connect(to: Endpoint(host: "127.0.0.1", port: endpoint.port &+ 1 == 0 ? 1 : endpoint.port &+ 1), timeout: 2)) { e in
            XCTAssertTrue("\(e)".contains("cannot connect"), "\(e)")
        }
    }
}
