import Foundation
import XCTest
import TopiaryModel
import TopiaryPrune
import TopiaryTensor
import TopiaryTestSupport
@testable import TopiaryCluster

/// Secrets are bytes: read exactly (one trailing newline dropped), refused when group or others
/// may read the file, or when too short.
final class SharedSecretTests: XCTestCase {
    func write(_ bytes: [UInt8], mode: mode_t, in dir: URL, name: String = "secret") throws -> String {
        let path = dir.appendingPathComponent(name).path
        XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
        XCTAssertEqual(chmod(path, mode), 0)
        return path
    }

    /// Two binary secrets that differ only in bytes that are not UTF-8 (which a UTF-8 decoding
    /// with replacement maps to the same text) are different secrets: the handshake fails.
    func testBinarySecretsThatDifferAreDifferentSecrets() throws {
        let dir = try makeTemporaryDirectory("secret")
        let common: [UInt8] = Array(repeating: 0x41, count: 16)
        let a = try SharedSecret.load(file: try write(common + [0xff, 0xfe, 0x80, 0x81], mode: 0o600, in: dir, name: "a"))
        let b = try SharedSecret.load(file: try write(common + [0xc0, 0xc1, 0xf5, 0xf8], mode: 0o600, in: dir, name: "b"))
        XCTAssertEqual(a.bytes, common + [0xff, 0xfe, 0x80, 0x81])
        XCTAssertNotEqual(a.bytes, b.bytes)
        var l = ListenerHandshake(secret: a, name: "w")
        var c = ConnectorHandshake(secret: b, name: "c", role: 0)
        let challenge = try l.receive(c.start())
        XCTAssertThrowsError(try c.receive(challenge[0])) { e in
            XCTAssertEqual(e as? WireError, .authenticationFailed("the listener did not prove knowledge of the shared secret"))
        }
        // The same bytes authenticate.
        var l2 = ListenerHandshake(secret: a, name: "w")
        var c2 = ConnectorHandshake(secret: try SharedSecret.load(file: dir.appendingPathComponent("a").path), name: "c", role: 0)
        let proof = try c2.receive(try l2.receive(c2.start())[0])
        XCTAssertEqual(try c2.receive(try l2.receive(proof[0])[0]), [])
        XCTAssertEqual(c2.state, .authenticated)
    }

    /// Exactly one trailing newline is dropped ("echo secret > f" works); nothing else is trimmed.
    func testOneTrailingNewlineIsDroppedAndNothingElse() throws {
        let dir = try makeTemporaryDirectory("secret")
        let text = Array("correct horse battery staple".utf8)
        XCTAssertEqual(try SharedSecret.load(file: try write(text + [0x0a], mode: 0o600, in: dir, name: "one")).bytes, text)
        XCTAssertEqual(try SharedSecret.load(file: try write(text, mode: 0o400, in: dir, name: "none")).bytes, text)
        XCTAssertEqual(try SharedSecret.load(file: try write(text + [0x0a, 0x0a], mode: 0o600, in: dir, name: "two")).bytes, text + [0x0a])
        XCTAssertEqual(try SharedSecret.load(file: try write([0x20] + text + [0x0d, 0x0a], mode: 0o600, in: dir, name: "spaces")).bytes,
                       [0x20] + text + [0x0d])
    }

    func testSecretFilesOthersCanReadAreRefusedNamingTheMode() throws {
        let dir = try makeTemporaryDirectory("secret")
        let bytes = Array("0123456789abcdef0123456789abcdef".utf8)
        for (mode, text) in [(mode_t(0o644), "0644"), (0o640, "0640"), (0o604, "0604"), (0o660, "0660"), (0o602, "0602")] {
            let path = try write(bytes, mode: mode, in: dir, name: "s\(text)")
            XCTAssertThrowsError(try SharedSecret.load(file: path)) { e in
                XCTAssertEqual("\(e)", "\(path): the secret file is accessible by group or others (mode \(text); expected 0600 or stricter): run 'chmod 600 \(path)'")
            }
        }
        XCTAssertThrowsError(try SharedSecret.load(file: "/etc/passwd")) { e in XCTAssertTrue("\(e)".contains("mode 0644"), "\(e)") }
        XCTAssertThrowsError(try SharedSecret.load(file: dir.path)) { e in XCTAssertTrue("\(e)".contains("not a regular file"), "\(e)") }
        XCTAssertThrowsError(try SharedSecret.load(file: dir.appendingPathComponent("missing").path)) { e in
            XCTAssertTrue("\(e)".contains("cannot open the secret file"), "\(e)")
        }
        // A FIFO does not block the open: it is refused as not a regular file.
        let fifo = dir.appendingPathComponent("fifo").path
        XCTAssertEqual(mkfifo(fifo, 0o600), 0)
        XCTAssertThrowsError(try SharedSecret.load(file: fifo)) { e in XCTAssertTrue("\(e)".contains("not a regular file"), "\(e)") }
        XCTAssertNoThrow(try SharedSecret.load(file: try write(bytes, mode: 0o600, in: dir, name: "ok")))
    }

    func testShortSecretsAreRefused() throws {
        let dir = try makeTemporaryDirectory("secret")
        let path = try write(Array("fifteen bytes!!\n".utf8), mode: 0o600, in: dir)
        XCTAssertThrowsError(try SharedSecret.load(file: path)) { e in
            XCTAssertEqual("\(e)", "\(path): the secret (after dropping one trailing newline) has 15 bytes; at least 16 are needed (e.g. 32 random bytes: head -c 32 /dev/urandom)")
        }
        XCTAssertThrowsError(try SharedSecret(bytes: Array(repeating: 1, count: 15)))
        XCTAssertNoThrow(try SharedSecret(bytes: Array(repeating: 1, count: 16)))
    }
}

/// Peers that are idle, slow, hostile or broken never hold a worker or a coordinator: every wait
/// is bounded, the worker serves connections concurrently, and every field is checked.
final class HostilePeerTests: XCTestCase {
    let secret = try! SharedSecret(bytes: Array("hostile peer tests secret 012345".utf8))
    let stories = TestPaths.asset("stories260K/stories260K.bin")
    let tokenizer = TestPaths.asset("stories260K/tok512.bin")

    func startServer(handshakeTimeout: Double = 10, maxPending: Int = 64, maxTensorBytes: Int = 4 << 30) throws -> WorkerServer {
        let dir = try makeTemporaryDirectory("worker")
        let listener = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        let server = WorkerServer(listener: listener, secret: secret, service: WorkerService(name: "w", workDirectory: dir.path))
        server.handshakeTimeout = handshakeTimeout
        server.maxTensorBytes = maxTensorBytes
        server.maxPendingHandshakes = maxPending
        server.start()
        addTeardownBlock { server.stop() }
        return server
    }

    func elapsed(since t: Double) -> Double { monotonicSeconds() - t }

    /// An idle connection, one that sends a hello a byte per second, and one that sends garbage
    /// are open; a coordinator still authenticates at once, and the first two are cut off at the
    /// handshake deadline (although the slow one keeps sending).
    func testIdleSlowAndGarbagePeersDoNotDelayACoordinator() throws {
        let server = try startServer(handshakeTimeout: 3)
        let endpoint = server.listener.endpoint
        let t0 = monotonicSeconds()
        let idle = try Connection.connect(to: endpoint)
        let garbage = try Connection.connect(to: endpoint)
        try garbage.sendRawForBenchmark((0..<600).map { UInt8(truncatingIfNeeded: $0 &* 37) })
        let slow = try Connection.connect(to: endpoint)
        let hello = Message.hello(minVersion: 1, maxVersion: 1, role: 0, nonce: Array(repeating: 7, count: 32), name: "slow").frame().encoded()
        let trickle = DispatchGroup()
        DispatchQueue.global().async(group: trickle) {
            for b in hello { if (try? slow.sendRawForBenchmark([b])) == nil { return }; Thread.sleep(forTimeInterval: 1) }
        }
        usleep(200_000)
        let good = try Connection.connect(to: endpoint)
        XCTAssertEqual(try good.authenticate(secret: secret, name: "coordinator", role: 0, within: 5), "w")
        XCTAssertLessThan(elapsed(since: t0), 2, "a coordinator waited behind idle, slow or garbage peers")
        // The worker serves it: a heartbeat comes back.
        try good.send(.heartbeat(sequence: 9))
        XCTAssertEqual(try good.receive(), .heartbeat(sequence: 9))

        guard case .error(401, let g) = try garbage.receive() else { return XCTFail("expected an error for the garbage peer") }
        XCTAssertTrue(g.contains("magic"), g)
        for (name, c) in [("idle", idle), ("slow", slow)] {
            c.timeout = 10
            guard case .error(401, let text) = try c.receive() else { return XCTFail("expected an error for the \(name) peer") }
            XCTAssertTrue(text.contains("the handshake did not complete within 3 s"), text)
            XCTAssertGreaterThan(elapsed(since: t0), 2.5)
            XCTAssertLessThan(elapsed(since: t0), 6, "\(name) peer held its connection past the handshake deadline")
        }
        XCTAssertEqual(trickle.wait(timeout: .now() + 60), .success)
        XCTAssertEqual(server.counts.pending, 0)
        good.close()
    }

    /// More unauthenticated connections than the bound: the oldest are closed, and a coordinator
    /// still gets in at once.
    func testUnauthenticatedConnectionsAreBounded() throws {
        let server = try startServer(handshakeTimeout: 30, maxPending: 4)
        let endpoint = server.listener.endpoint
        var idle: [Connection] = []
        for _ in 0..<10 { idle.append(try Connection.connect(to: endpoint)) }
        let deadline = Date().addingTimeInterval(5)
        while server.counts.pending < 4 && Date() < deadline { usleep(10_000) }
        let t0 = monotonicSeconds()
        let good = try Connection.connect(to: endpoint)
        XCTAssertEqual(try good.authenticate(secret: secret, name: "coordinator", role: 0, within: 5), "w")
        XCTAssertLessThan(elapsed(since: t0), 2)
        XCTAssertLessThanOrEqual(server.counts.pending, 4)
        let served = Date().addingTimeInterval(5)
        while server.counts.sessions != 1 && Date() < served { usleep(10_000) }
        XCTAssertEqual(server.counts.sessions, 1)
        // The oldest idle connection was closed by the worker.
        idle[0].timeout = 5
        XCTAssertThrowsError(try idle[0].receive()) { e in XCTAssertTrue("\(e)".contains("closed"), "\(e)") }
        good.close()
        for c in idle { c.close() }
    }

    /// A listener that accepts and never answers: the handshake fails at its deadline, naming it.
    func testHandshakeWithASilentListenerFailsAtItsDeadline() throws {
        let silent = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0))   // never accepts; the kernel does
        let c = try Connection.connect(to: silent.endpoint, timeout: 2)
        let t0 = monotonicSeconds()
        XCTAssertThrowsError(try c.authenticate(secret: secret, name: "coordinator", role: 0, within: 1)) { e in
            XCTAssertTrue("\(e)".contains("the handshake did not complete within 1 s (waiting for a challenge or error message)"), "\(e)")
        }
        XCTAssertLessThan(elapsed(since: t0), 3)
        _ = silent
    }

    /// A peer that stops reading fails a send after the timeout instead of blocking it.
    func testSendToAPeerThatDoesNotReadTimesOut() throws {
        let silent = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        let c = try Connection.connect(to: silent.endpoint, timeout: 1)
        let t0 = monotonicSeconds()
        let big = Matrix(rows: 4096, cols: 4096)   // 64 MiB, more than any socket buffer
        XCTAssertThrowsError(try c.sendTensor(big, name: "big", stream: 0)) { e in
            XCTAssertTrue("\(e)".contains("the peer is not reading"), "\(e)")
        }
        XCTAssertLessThan(elapsed(since: t0), 10)
        _ = silent
    }

    /// A frame that has begun must be complete within the frame timeout, however steadily its
    /// bytes trickle in.
    func testATricklingFrameFailsAtTheFrameDeadline() throws {
        let listener = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        let client = try Connection.connect(to: listener.endpoint)
        let server = try XCTUnwrap(try listener.accept(timeout: 5))
        server.timeout = 5
        server.frameTimeout = 1
        let frame = Message.heartbeat(sequence: 1).frame().encoded()
        let trickle = DispatchGroup()
        DispatchQueue.global().async(group: trickle) {
            for b in frame { if (try? client.sendRawForBenchmark([b])) == nil { return }; Thread.sleep(forTimeInterval: 0.3) }
        }
        let t0 = monotonicSeconds()
        XCTAssertThrowsError(try server.receive()) { e in
            XCTAssertTrue("\(e)".contains("a frame did not arrive complete within 1 s"), "\(e)")
        }
        XCTAssertLessThan(elapsed(since: t0), 2.5)
        server.close()
        XCTAssertEqual(trickle.wait(timeout: .now() + 30), .success)
    }

    // MARK: Jobs

    struct Fixture {
        let model: LanguageModel
        let job: PruneJob
        let boundary: Boundary
        let dir: String
    }

    func fixture(samples: Int = 2, sequenceLength: Int = 32) throws -> Fixture {
        let model = try LanguageModel.open(path: stories, tokenizerPath: tokenizer)
        let text = try String(contentsOfFile: TestPaths.asset("public-domain-text/wizard_of_oz.txt"), encoding: .utf8)
        let windows = try Calibration.windows(tokens: model.tokenizer!.encode(text, addBOS: nil), samples: samples, sequenceLength: sequenceLength, seed: 0)
        let dir = try makeTemporaryDirectory("jobs").path
        let job = PruneJob(plan: PrunePlan(method: .wanda, pattern: .unstructured(0.5)), calibration: windows,
                           sequenceLength: sequenceLength, layers: nil, memoryBudget: 1 << 28, workDirectory: dir)
        let boundary = try PrunePipeline(model: model, job: job, store: try BlockFileStore(directory: dir + "/embed")).embed()
        return Fixture(model: model, job: job, boundary: boundary, dir: dir)
    }

    func assignment(_ f: Fixture, first: Int = 0, end: Int = 1) -> Assignment {
        Assignment(modelPath: stories, tokenizerPath: tokenizer, plan: f.job.plan, sequenceLength: f.job.sequenceLength,
                   samples: f.job.samples, layers: nil, memoryBudget: f.job.memoryBudget, blocks: first..<end,
                   hasTargets: false, denseOnly: false, heartbeatInterval: 5)
    }

    func json(_ a: Assignment) throws -> [UInt8] { Array(try JSONEncoder().encode(a)) }

    /// `a`'s JSON with the top-level fields in `changes` set as given: a job no `Assignment`
    /// can hold (its ranges are checked as they are made), as a hostile peer may send it.
    func json(_ a: Assignment, setting changes: [String: Any]) throws -> [UInt8] {
        var object = try JSONSerialization.jsonObject(with: Data(try json(a))) as! [String: Any]
        for (k, v) in changes { object[k] = v }
        return Array(try JSONSerialization.data(withJSONObject: object))
    }

    /// The legitimate job of blocks 0-1 over `c` gives what this process computes.
    func assertLegitimateJobRuns(on c: Connection, _ f: Fixture, file: StaticString = #filePath, line: UInt = #line) throws {
        let link = RemoteWorker(connection: c, name: "w", model: f.model, tokenizerPath: tokenizer)
        var remote: [Int: DecoderBlock] = [:]
        let end = try link.run(0..<2, job: f.job, from: f.boundary) { i, b, _ in remote[i] = b }
        var local: [Int: DecoderBlock] = [:]
        let expected = try InProcessWorker(model: f.model).run(0..<2, job: f.job, from: f.boundary) { i, b, _ in local[i] = b }
        XCTAssertEqual(remote.keys.sorted(), [0, 1], file: file, line: line)
        for i in 0..<2 { XCTAssertEqual(remote[i]?.tensors, local[i]?.tensors, "block \(i)", file: file, line: line) }
        for s in 0..<f.job.samples { XCTAssertEqual(try end.inputs.get(s), try expected.inputs.get(s), file: file, line: line) }
    }

    /// Each malformed job gets an error reply naming the field, and the worker serves the next
    /// (legitimate) job on the same connection.
    func testMalformedJobsGetAnErrorAndTheWorkerKeepsServing() throws {
        let f = try fixture()
        let server = try startServer()
        let c = try Connection.connect(to: server.listener.endpoint)
        _ = try c.authenticate(secret: secret, name: "coordinator", role: 0, within: 5)
        c.timeout = 30
        let good = assignment(f)
        func with(_ change: (inout Assignment) -> Void) -> Assignment { var a = good; change(&a); return a }
        let cases: [(String, [UInt8], String)] = [
            ("sequenceLength -1", try json(with { $0.sequenceLength = -1 }), "field 'sequenceLength' is -1"),
            ("samples -1", try json(with { $0.samples = -1 }), "field 'samples' is -1"),
            ("samples 2^40", try json(with { $0.samples = 1 << 40 }), "field 'samples' is 1099511627776"),
            ("samples 3 (2 sent)", try json(with { $0.samples = 3 }), "field 'tensors' announces 2 tensors, expected 3"),
            ("layers [3, 1]", try json(good, setting: ["layers": [3, 1]]), "field 'layers' is [3, 1]"),
            ("layers []", try json(good, setting: ["layers": [Int]()]), "field 'layers' is []"),
            ("layers [2]", try json(good, setting: ["layers": [2]]), "field 'layers' is [2]"),
            ("layers [-1, 2]", try json(good, setting: ["layers": [-1, 2]]), "field 'layers' is [-1, 2]"),
            ("layers [0, 9]", try json(with { $0.layers = 0...9 }), "past the model's 5 blocks"),
            ("range 4..<9", try json(with { $0.blocks = 4..<9 }), "outside the model's 5 blocks"),
            ("range 3..<1", try json(good, setting: ["first": 3, "end": 1]), "field 'range' 3..<1"),
            ("range 2..<2", try json(good, setting: ["first": 2, "end": 2]), "field 'range' 2..<2"),
            ("range -1..<1", try json(good, setting: ["first": -1]), "field 'range' -1..<1"),
            ("sequenceLength 4096", try json(with { $0.sequenceLength = 4096 }), "longer than the model's context"),
            ("memoryBudget -1", try json(with { $0.memoryBudget = -1 }), "field 'memoryBudget'"),
            ("heartbeat 0", try json(with { $0.heartbeatInterval = 0 }), "field 'heartbeatInterval' is 0.0"),
            ("sparsity 1.5", try json(with { $0.plan.pattern = .unstructured(1.5) }), "field 'plan.pattern' is sparsity 1.5"),
            ("pattern 2:2^40", try json(with { $0.plan.pattern = .nOfM(n: 2, m: 1 << 40) }), "field 'plan.pattern' is 2:1099511627776"),
            ("blocksize 2^40", try json(with { $0.plan.sparseGPT.blockSize = 1 << 40 }), "field 'plan.sparseGPT.blockSize'"),
            ("weights without config", try json(with { $0.weightTensors = 0 }), "field 'weightTensors'"),
            ("not JSON", Array("{\"modelPath\": ".utf8), "field 'job' is not a valid job"),
            ("unreadable model", try json(with { $0.modelPath = f.dir + "/missing.bin" }), "missing.bin"),
        ]
        for (what, job, expected) in cases {
            try c.send(.assign(job: job, tensors: 2))
            try BoundaryTransfer.send(f.boundary, over: c)
            guard case .error(400, let text) = try c.receive() else { XCTFail("\(what): expected an error reply"); continue }
            XCTAssertTrue(text.contains(expected), "\(what): \(text)")
        }
        // Tensors that are not what a good job announces: drained, refused, the connection stays.
        let badTensors: [(String, () throws -> Void, String)] = [
            ("a mis-shaped input", { try c.sendTensor(Matrix(rows: 31, cols: 64), name: "inputs/0", stream: 0); try c.sendTensor(try f.boundary.inputs.get(1), name: "inputs/1", stream: 1) },
             "field 'shape' of 'inputs/0' is 31x64, expected 32x64"),
            ("a repeated input", { try c.sendTensor(try f.boundary.inputs.get(0), name: "inputs/0", stream: 0); try c.sendTensor(try f.boundary.inputs.get(0), name: "inputs/0", stream: 1) },
             "'inputs/0' arrived twice"),
            ("a window out of range", { try c.sendTensor(try f.boundary.inputs.get(0), name: "inputs/0", stream: 0); try c.sendTensor(try f.boundary.inputs.get(1), name: "inputs/7", stream: 1) },
             "is 'inputs/7', expected inputs/N with N < 2"),
            ("targets not announced", { try c.sendTensor(try f.boundary.inputs.get(0), name: "inputs/0", stream: 0); try c.sendTensor(try f.boundary.inputs.get(1), name: "targets/1", stream: 1) },
             "is 'targets/1'"),
        ]
        for (what, send, expected) in badTensors {
            try c.send(.assign(job: try json(good), tensors: 2))
            try send()
            guard case .error(400, let text) = try c.receive() else { XCTFail("\(what): expected an error reply"); continue }
            XCTAssertTrue(text.contains(expected), "\(what): \(text)")
        }
        try assertLegitimateJobRuns(on: c, f)
        c.close()
    }

    /// A tensor header of 2^20 x 2^20 gets an error reply without any allocation; the
    /// connection closes (the tensor is too large to drain), and the worker serves the next one.
    func testAHugeTensorHeaderGetsAnErrorAndTheWorkerKeepsServing() throws {
        let f = try fixture()
        let server = try startServer()
        for announce in [assignment(f), { var a = assignment(f); a.samples = -1; return a }()] {
            let c = try Connection.connect(to: server.listener.endpoint)
            _ = try c.authenticate(secret: secret, name: "coordinator", role: 0, within: 5)
            c.timeout = 30
            try c.send(.assign(job: try json(announce), tensors: 2))
            try c.send(.tensorHeader(stream: 0, name: "inputs/0", dtype: .f32, shape: [1 << 20, 1 << 20], byteCount: 1 << 42))
            guard case .error(400, let text) = try c.receive() else { return XCTFail("expected an error reply") }
            XCTAssertTrue(text.contains("1048576x1048576") || text.contains("samples"), text)
            XCTAssertThrowsError(try c.receive())
            c.close()
        }
        let c = try Connection.connect(to: server.listener.endpoint)
        _ = try c.authenticate(secret: secret, name: "coordinator", role: 0, within: 5)
        c.timeout = 30
        try assertLegitimateJobRuns(on: c, f)
        c.close()
    }

    /// A job whose tensors would exceed the worker's tensor limit is refused before any is read,
    /// naming the field and the limit; tensors within the limit are drained and the connection
    /// serves on; one over it gets the same reply and closes it. A window of exactly the limit runs.
    func testJobsWhoseTensorsExceedTheTensorLimitAreRefusedNamingIt() throws {
        let f = try fixture()   // windows of 32 x 64 floats: 8 KiB
        let server = try startServer(maxTensorBytes: 8192)
        let c = try Connection.connect(to: server.listener.endpoint)
        _ = try c.authenticate(secret: secret, name: "coordinator", role: 0, within: 5)
        c.timeout = 30
        var long = assignment(f)
        long.sequenceLength = 64
        try c.send(.assign(job: try json(long), tensors: 2))
        try BoundaryTransfer.send(f.boundary, over: c)
        guard case .error(400, let text) = try c.receive() else { return XCTFail("expected an error reply") }
        XCTAssertTrue(text.contains("field 'sequenceLength' is 64: a window of 64x64 floats is over the tensor limit of 8192 bytes"), text)
        // Within the limit (8 KiB windows): the legitimate job runs on the same connection.
        try assertLegitimateJobRuns(on: c, f)
        c.close()

        // Weights sent with the job, larger than the limit: refused naming the block tensor; the
        // first tensor over the limit is not drained, and the connection closes after the reply.
        let d = try Connection.connect(to: server.listener.endpoint)
        _ = try d.authenticate(secret: secret, name: "coordinator", role: 0, within: 5)
        d.timeout = 30
        var sent = assignment(f)
        sent.modelPath = ""
        sent.tokenizerPath = nil
        sent.config = f.model.config
        let block = try f.model.loadBlock(0)
        sent.weightTensors = block.tensors.count
        let large = try XCTUnwrap(block.tensors.keys.sorted().first { block.tensors[$0]!.count * 4 > 8192 })
        try d.send(.assign(job: try json(sent), tensors: UInt32(2 + block.tensors.count)))
        try BoundaryTransfer.send(f.boundary, over: d)
        let m = block.tensors[large]!
        try d.send(.tensorHeader(stream: 0, name: large, dtype: .f32, shape: [m.rows, m.cols], byteCount: UInt64(m.count * 4)))
        guard case .error(400, let text2) = try d.receive() else { return XCTFail("expected an error reply") }
        XCTAssertTrue(text2.contains("field 'config' gives block tensor 'model.layers.0."), text2)
        XCTAssertTrue(text2.contains("floats, over the tensor limit of 8192 bytes"), text2)
        XCTAssertThrowsError(try d.receive())
        d.close()
    }

    /// A sent configuration may claim 4096 blocks of 1024 experts (12.6 million block tensors);
    /// the worker does not list them all (it took a minute and 4 GB before any tensor arrived):
    /// the announced count is bounded, and the listing stops once past it.
    func testAClaimedWeightCountIsBoundedBeforeTheWorkerListsTheTensors() throws {
        let f = try fixture()
        var c = ModelConfig(architecture: .mixtral, hiddenSize: 8, intermediateSize: 16, layerCount: 4096, headCount: 2, kvHeadCount: 1,
                            vocabularySize: 40, maxPositions: 32, normEps: 1e-5, tieWordEmbeddings: false)
        c.expertCount = 1024
        c.expertsPerToken = 1
        let perBlock = c.family.blockTensors(c, block: 0).count
        var a = assignment(f)
        a.modelPath = ""
        a.tokenizerPath = nil
        a.samples = 1
        a.sequenceLength = 4
        a.config = c
        let service = WorkerService(name: "check", workDirectory: f.dir)
        let input = TensorAnnouncement(stream: 0, name: "inputs/0", dtype: .f32, shape: [4, 8], byteCount: 128)
        for (range, weights, expected) in [(0..<4096, 1, "field 'weightTensors' is 1, expected at least \(perBlock): the tensors of blocks 0-4095"),
                                           (0..<4096, perBlock * 4096, "field 'weightTensors' is \(perBlock * 4096), expected 0...262144"),
                                           (0..<2, 3 * perBlock, "field 'weightTensors' is \(3 * perBlock), expected \(2 * perBlock)")] {
            (a.blocks, a.weightTensors) = (range, weights)
            let t0 = monotonicSeconds()
            XCTAssertThrowsError(try service.checkJob(try json(a), tensors: UInt32(1 + weights), headers: [input])) { e in
                XCTAssertTrue("\(e)".contains(expected), "\(e)")
            }
            XCTAssertLessThan(elapsed(since: t0), 2)
        }
        // Within the bound, the same configuration's blocks are checked one by one as they arrive.
        (a.blocks, a.weightTensors) = (0..<2, 2 * perBlock)
        let headers = (0..<2).flatMap { c.family.blockTensors(c, block: $0) }.map {
            TensorAnnouncement(stream: 0, name: $0.name, dtype: .f32, shape: $0.shape, byteCount: UInt64($0.rows * $0.cols * 4))
        }
        XCTAssertNoThrow(try service.checkJob(try json(a), tensors: UInt32(1 + 2 * perBlock), headers: [input] + headers))
    }

    func testReplicaFieldsAndAnotherReplicasWindowsAreRefusedNamingTheField() throws {
        let f = try fixture(samples: 4)
        let service = WorkerService(name: "check", workDirectory: f.dir)
        var a = assignment(f)
        let header = { (s: Int) in TensorAnnouncement(stream: 0, name: "inputs/\(s)", dtype: .f32, shape: [32, 64], byteCount: 32 * 64 * 4) }
        let peers = ["127.0.0.1:1", "127.0.0.1:2"]
        for (spec, expected) in [(Assignment.ReplicaSpec(rank: 2, count: 2, group: "g", peers: peers), "field 'replica' is rank 2 of 2"),
                                 (Assignment.ReplicaSpec(rank: 0, count: 0, group: "g", peers: []), "field 'replica' is rank 0 of 0"),
                                 (Assignment.ReplicaSpec(rank: 0, count: 2, group: "g", peers: ["127.0.0.1:1"]), "field 'replica.peers' lists 1 addresses for 2"),
                                 (Assignment.ReplicaSpec(rank: 0, count: 2, group: "", peers: peers), "field 'replica.group'"),
                                 (Assignment.ReplicaSpec(rank: 0, count: 2, group: "g", peers: ["127.0.0.1:1", "nowhere"]), "field 'replica.peers' entry 1 'nowhere'")] {
            a.replica = spec
            XCTAssertThrowsError(try service.checkJob(try json(a), tensors: 2, headers: [header(0), header(2)])) { e in
                XCTAssertTrue("\(e)".contains(expected), "\(e)")
            }
        }
        // Replica 1 of 2 runs windows 2 and 3 (a contiguous range): window 1 is refused, and so is a missing window 3.
        a.replica = Assignment.ReplicaSpec(rank: 1, count: 2, group: "g", peers: peers)
        XCTAssertThrowsError(try service.checkJob(try json(a), tensors: 2, headers: [header(2), header(1)])) { e in
            XCTAssertTrue("\(e)".contains("window 1 is replica 0's, not replica 1's of 2"), "\(e)")
        }
        XCTAssertThrowsError(try service.checkJob(try json(a), tensors: 4, headers: [header(2), header(3)])) { e in
            XCTAssertTrue("\(e)".contains("announces 4 tensors, expected 2"), "\(e)")
        }
        XCTAssertThrowsError(try service.checkJob(try json(a), tensors: 2, headers: [header(2)])) { e in
            XCTAssertTrue("\(e)".contains("inputs/3 is missing"), "\(e)")
        }
        XCTAssertNoThrow(try service.checkJob(try json(a), tensors: 2, headers: [header(3), header(2)]))
    }

    func testAGarbageReplicaMessageIsRefusedNamingTheField() throws {
        var bytes = Message.replica(block: 1, kind: 1, name: "x", index: 0, form: 1, bytes: []).encodedPayload()
        // form is the byte after block (4), kind (1), name (4 + 1) and index (4).
        bytes[4 + 1 + 5 + 4] = 9
        XCTAssertThrowsError(try Message.decode(Frame(type: .replica, payload: bytes))) { e in
            XCTAssertTrue("\(e)".contains("field 'form'") || "\(e)".contains("form"), "\(e)")
        }
        let join = Message.peerJoin(group: "g", rank: 3)
        guard case .peerJoin(let g, let r) = try Message.decode(join.frame()) else { return XCTFail("peer-join did not round-trip") }
        XCTAssertEqual(g, "g")
        XCTAssertEqual(r, 3)
    }

    /// The worker's virtual memory size (VmSize), in bytes.
    func virtualMemoryBytes() throws -> Int {
        let status = try String(contentsOfFile: "/proc/self/status", encoding: .utf8)
        let line = try XCTUnwrap(status.split(separator: "\n").first { $0.hasPrefix("VmSize:") })
        return try XCTUnwrap(Int(line.split(separator: " ").dropFirst().first ?? "")) * 1024
    }

    /// A job that legitimately announces a 4 GiB window (sent configuration of hidden size 2^15,
    /// sequences of 2^15): the header alone reserves no more than the assembler's initial
    /// capacity; the peer that then sends nothing more costs the worker nothing like 4 GiB, and
    /// the worker serves the next connection.
    func testAnAnnouncedTensorIsNotAllocatedBeforeItsBytesArrive() throws {
        let f = try fixture()
        let server = try startServer()
        let c = try Connection.connect(to: server.listener.endpoint)
        _ = try c.authenticate(secret: secret, name: "coordinator", role: 0, within: 5)
        c.timeout = 30
        let hidden = 1 << 15
        let config = ModelConfig(architecture: .llama, hiddenSize: hidden, intermediateSize: 1 << 14, layerCount: 1, headCount: 256,
                                 kvHeadCount: 256, vocabularySize: 32000, maxPositions: 1 << 15, normEps: 1e-5, tieWordEmbeddings: false)
        var a = assignment(f)
        a.modelPath = ""
        a.tokenizerPath = nil
        a.samples = 1
        a.sequenceLength = 1 << 15
        a.blocks = 0..<1
        a.config = config
        let weights = config.family.blockTensors(config, block: 0)
        a.weightTensors = weights.count
        let window = TensorAnnouncement(stream: 0, name: "inputs/0", dtype: .f32, shape: [1 << 15, hidden], byteCount: 1 << 32)
        // The job and the window's header pass every check: the worker goes on to receive the window.
        XCTAssertNoThrow(try WorkerService(name: "check", workDirectory: f.dir).checkJob(
            try json(a), tensors: UInt32(1 + weights.count),
            headers: [window] + weights.map { TensorAnnouncement(stream: 0, name: $0.name, dtype: .f32, shape: $0.shape, byteCount: UInt64($0.rows * $0.cols * 4)) }))
        try c.send(.assign(job: try json(a), tensors: UInt32(1 + a.weightTensors!)))
        Thread.sleep(forTimeInterval: 0.5)
        let before = try virtualMemoryBytes()
        try c.send(window.message)
        try c.send(.tensorChunk(stream: 0, offset: 0, bytes: Array(repeating: 0, count: 1 << 20)))
        Thread.sleep(forTimeInterval: 1)
        let grown = try virtualMemoryBytes() - before
        XCTAssertLessThan(grown, 1 << 30, "the worker reserved \(grown) bytes for a header and 1 MiB of data")
        c.close()
        let d = try Connection.connect(to: server.listener.endpoint)
        _ = try d.authenticate(secret: secret, name: "coordinator", role: 0, within: 5)
        d.timeout = 30
        try d.send(.heartbeat(sequence: 3))
        XCTAssertEqual(try d.receive(), .heartbeat(sequence: 3))
        d.close()
    }

    /// The header of a block's weights with the wrong shape is refused before allocation, also
    /// with weights sent by the coordinator.
    func testSentWeightsAreCheckedAgainstTheModelFamily() throws {
        let f = try fixture()
        let server = try startServer()
        let c = try Connection.connect(to: server.listener.endpoint)
        _ = try c.authenticate(secret: secret, name: "coordinator", role: 0, within: 5)
        c.timeout = 30
        var a = assignment(f)
        a.modelPath = ""
        a.tokenizerPath = nil
        a.config = f.model.config
        let block = try f.model.loadBlock(0)
        let names = block.tensors.keys.sorted()
        a.weightTensors = names.count
        // One tensor transposed.
        try c.send(.assign(job: try json(a), tensors: UInt32(2 + names.count)))
        try BoundaryTransfer.send(f.boundary, over: c)
        var transposed = false
        for (k, n) in names.enumerated() {
            var m = block.tensors[n]!
            if !transposed && m.rows != m.cols && m.rows > 1 { m = m.transposed(); transposed = true }
            try c.sendTensor(m, name: n, stream: UInt32(k))
        }
        guard case .error(400, let text) = try c.receive() else { return XCTFail("expected an error reply") }
        XCTAssertTrue(text.contains("field 'shape'"), text)
        // A count that does not match the blocks' tensors.
        a.weightTensors = names.count - 1
        try c.send(.assign(job: try json(a), tensors: UInt32(2 + names.count - 1)))
        try BoundaryTransfer.send(f.boundary, over: c)
        for (k, n) in names.dropLast().enumerated() { try c.sendTensor(block.tensors[n]!, name: n, stream: UInt32(k)) }
        guard case .error(400, let text2) = try c.receive() else { return XCTFail("expected an error reply") }
        XCTAssertTrue(text2.contains("field 'weightTensors' is \(names.count - 1), expected \(names.count)"), text2)
        // A sent config with an impossible size.
        var huge = a
        huge.config!.hiddenSize = 1 << 40
        huge.weightTensors = names.count
        try c.send(.assign(job: try json(huge), tensors: UInt32(2 + names.count)))
        try BoundaryTransfer.send(f.boundary, over: c)
        for (k, n) in names.enumerated() { try c.sendTensor(block.tensors[n]!, name: n, stream: UInt32(k)) }
        guard case .error(400, let text3) = try c.receive() else { return XCTFail("expected an error reply") }
        XCTAssertTrue(text3.contains("hiddenSize") || text3.contains("hidden_size"), text3)
        try assertLegitimateJobRuns(on: c, f)
        c.close()
    }

    /// A worker that authenticates and then neither reads nor answers: the coordinator's waits
    /// end at its timeout, naming the worker and the phase (assignment, computing).
    func testCoordinatorWaitsAreBoundedAndNameThePhase() throws {
        let f = try fixture()
        let listener = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        let secret = self.secret
        let release = DispatchSemaphore(value: 0)
        let group = DispatchGroup()
        DispatchQueue.global().async(group: group) {
            for _ in 0..<2 {
                guard let c = try? listener.accept(timeout: 30) else { return }
                _ = try? c.acceptHandshake(secret: secret, name: "mute", within: 10)
                release.wait()   // silent: reads nothing, sends nothing
                c.close()
            }
        }
        func link() throws -> RemoteWorker {
            let c = try Connection.connect(to: listener.endpoint)
            _ = try c.authenticate(secret: secret, name: "coordinator", role: 0, within: 5)
            c.timeout = 1
            return RemoteWorker(connection: c, name: "worker@mute", model: f.model, tokenizerPath: tokenizer)
        }
        // Computing: the small assignment fits the socket buffers; then no result, no heartbeat.
        var t0 = monotonicSeconds()
        XCTAssertThrowsError(try link().run(0..<5, job: f.job, from: f.boundary) { _, _, _ in }) { e in
            XCTAssertTrue("\(e)".hasPrefix("worker@mute, computing block 0 (waiting for its result or a heartbeat): 127.0.0.1:"), "\(e)")
            XCTAssertTrue("\(e)".contains("no data for 1 s"), "\(e)")
        }
        XCTAssertLessThan(elapsed(since: t0), 5)
        release.signal()
        // Assignment: 160 windows of 512 x 64 (20 MiB), more than the socket buffers hold.
        let windows = ActivationStore(count: 160, rows: 512, cols: 64, budgetBytes: 1 << 30, spillDirectory: f.dir)
        for s in 0..<160 { try windows.set(s, Matrix(rows: 512, cols: 64)) }
        var job = f.job
        job.calibration = Array(repeating: Array(repeating: 1, count: 512), count: 160)
        job.sequenceLength = 512
        t0 = monotonicSeconds()
        XCTAssertThrowsError(try link().start(0..<5, job: job, from: Boundary(inputs: windows, targets: nil))) { e in
            XCTAssertTrue("\(e)".hasPrefix("worker@mute, assignment of blocks 0-4: 127.0.0.1:"), "\(e)")
            XCTAssertTrue("\(e)".contains("the peer is not reading"), "\(e)")
        }
        XCTAssertLessThan(elapsed(since: t0), 10)
        release.signal()
        XCTAssertEqual(group.wait(timeout: .now() + 30), .success)
    }

    // MARK: Results

    enum BadResult: CaseIterable { case missingTensor, repeatedTensor, foreignTensor, misshapedTensor, wrongBlock, noReport, badReport }

    /// A worker that authenticates, takes the assignment and answers with a broken block result.
    func startFakeWorker(_ bad: BadResult, model: LanguageModel) throws -> (Endpoint, DispatchGroup) {
        let listener = try Listener(endpoint: Endpoint(host: "127.0.0.1", port: 0))
        let group = DispatchGroup()
        let secret = self.secret
        DispatchQueue.global().async(group: group) {
            guard let c = try? listener.accept(timeout: 30) else { return }
            defer { c.close() }
            do {
                _ = try c.acceptHandshake(secret: secret, name: "fake", within: 10)
                guard case .assign(let job, let tensors) = try c.receive() else { return }
                for _ in 0..<tensors { _ = try c.receiveTensor() }
                let a = try JSONDecoder().decode(Assignment.self, from: Data(job))
                let block = try model.loadBlock(a.blocks.lowerBound)
                var names = block.tensors.keys.sorted()
                var index = a.blocks.lowerBound
                var report = Array("{\"block\":\(a.blocks.lowerBound),\"linears\":[],\"outputError\":0,\"seconds\":0}".utf8)
                var misshape = ""
                switch bad {
                case .missingTensor: names.removeLast()
                case .repeatedTensor: names[names.count - 1] = names[0]
                case .foreignTensor: names[names.count - 1] = "model.layers.\(a.blocks.lowerBound).mlp.extra.weight"
                case .misshapedTensor: misshape = names.first { block.tensors[$0]!.rows > 1 && block.tensors[$0]!.rows != block.tensors[$0]!.cols }!
                case .wrongBlock: index = a.blocks.lowerBound + 1
                case .noReport: report = []
                case .badReport: report = Array("{\"block\": \"x\"}".utf8)
                }
                try c.send(.blockResult(block: UInt32(index), tensors: UInt32(names.count), report: report))
                for (k, n) in names.enumerated() {
                    let m = block.tensors[n] ?? block.tensors[names[0]]!
                    try c.sendTensor(n == misshape ? m.transposed() : m, name: n, stream: UInt32(k))
                }
                while true { _ = try c.receive() }
            } catch {}
        }
        return (listener.endpoint, group)
    }

    /// A result that does not carry exactly the block's tensors with their shapes is refused: the
    /// worker is given up and its range redone elsewhere (here: in the coordinator), and the
    /// weights equal the single-process run's; nothing falls back to the dense weights.
    func testBrokenResultsAreRefusedAndTheRangeRedone() throws {
        let f = try fixture()
        let single = try BlockFileStore(directory: f.dir + "/single")
        _ = try PrunePipeline(model: f.model, job: f.job, store: single).run { _, _ in }
        let expected = try (0..<5).map { try f.model.overlaid(with: try single.sources(Array(0..<5))).loadBlock($0).tensors }
        let details: [BadResult: String] = [
            .missingTensor: "field 'tensors' is 8 for block 0, expected its 9 tensors",
            .repeatedTensor: "arrived twice",
            .foreignTensor: "'model.layers.0.mlp.extra.weight' is not one of the block's tensors",
            .misshapedTensor: "field 'shape'",
            .wrongBlock: "field 'block' is 1, expected 0",
            .noReport: "block 0 is pruned: expected its report and tensors",
            .badReport: "field 'report' of block 0 is not a block report",
        ]
        for bad in BadResult.allCases {
            let (endpoint, fake) = try startFakeWorker(bad, model: f.model)
            let c = try Connection.connect(to: endpoint)
            _ = try c.authenticate(secret: secret, name: "coordinator", role: 0, within: 5)
            c.timeout = 30
            let link = RemoteWorker(connection: c, name: "worker@fake", model: f.model, tokenizerPath: tokenizer)
            let store = try BlockFileStore(directory: f.dir + "/\(bad)")
            let coordinator = Coordinator(model: f.model, job: f.job, store: store, workers: [link])
            nonisolated(unsafe) var log: [String] = []
            coordinator.log = { log.append($0) }
            _ = try coordinator.run { _, _ in }
            let lost = log.first { $0.contains("worker worker@fake lost") } ?? ""
            XCTAssertTrue(lost.contains("transfer of block \(bad == .wrongBlock ? 1 : 0)") && lost.contains(details[bad]!), "\(bad): \(log)")
            XCTAssertTrue(log.contains { $0.contains("reassigned to coordinator (in-process)") }, "\(bad): \(log)")
            let got = try (0..<5).map { try f.model.overlaid(with: try store.sources(Array(0..<5))).loadBlock($0).tensors }
            XCTAssertEqual(got, expected, "\(bad): the redone range differs from the single-process run")
            XCTAssertEqual(fake.wait(timeout: .now() + 30), .success)
        }
    }
}
