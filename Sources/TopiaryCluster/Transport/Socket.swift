import TopiaryTensor
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A TCP endpoint "HOST:PORT" (IPv4 or a name; "[v6]:PORT" for IPv6).
public struct Endpoint: Equatable, Sendable, CustomStringConvertible {
    public var host: String
    public var port: UInt16

    public init(host: String, port: UInt16) {
        self.host = host
        self.port = port
    }

    public init(parsing text: String) throws {
        var host = text
        var portText = ""
        if text.hasPrefix("["), let close = text.firstIndex(of: "]") {
            host = String(text[text.index(after: text.startIndex)..<close])
            let rest = text[text.index(after: close)...]
            guard rest.hasPrefix(":") else { throw WireError.connection("'\(text)': expected [IPv6]:PORT") }
            portText = String(rest.dropFirst())
        } else if let colon = text.lastIndex(of: ":") {
            host = String(text[..<colon])
            portText = String(text[text.index(after: colon)...])
        }
        guard !host.isEmpty, let port = UInt16(portText) else {
            throw WireError.connection("'\(text)': expected HOST:PORT with a port from 0 to 65535")
        }
        self.host = host
        self.port = port
    }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }

    /// Whether the host is a loopback address (127.0.0.0/8, ::1, localhost).
    public var isLoopback: Bool { host == "localhost" || host == "::1" || host.hasPrefix("127.") }

    func resolve() throws -> [addrinfo] {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var result: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, String(port), &hints, &result)
        guard rc == 0, let first = result else {
            throw WireError.connection("\(self): cannot resolve host: \(String(cString: gai_strerror(rc)))")
        }
        defer { freeaddrinfo(first) }
        var out: [addrinfo] = []
        var p: UnsafeMutablePointer<addrinfo>? = first
        while let a = p {
            var copy = a.pointee
            // Keep the address bytes alive past freeaddrinfo.
            let storage = UnsafeMutableRawPointer.allocate(byteCount: Int(copy.ai_addrlen), alignment: 8)
            storage.copyMemory(from: copy.ai_addr, byteCount: Int(copy.ai_addrlen))
            copy.ai_addr = storage.assumingMemoryBound(to: sockaddr.self)
            copy.ai_next = nil
            copy.ai_canonname = nil
            out.append(copy)
            p = a.pointee.ai_next
        }
        return out
    }
}

/// Bytes this process has sent and received over every `Connection` (frames, tensors and the
/// handshake; what the kernel accepted or delivered), for benchmarks and progress events.
public enum WireTraffic {
    private static let lock = NSLock()
    nonisolated(unsafe) private static var sentBytes = 0
    nonisolated(unsafe) private static var receivedBytes = 0

    static func count(sent: Int = 0, received: Int = 0) {
        lock.lock()
        sentBytes += sent
        receivedBytes += received
        lock.unlock()
    }

    /// (sent, received) bytes so far.
    public static var totals: (sent: Int, received: Int) {
        lock.lock()
        defer { lock.unlock() }
        return (sentBytes, receivedBytes)
    }
}

func errnoText() -> String { String(cString: strerror(errno)) }

/// Seconds on a monotonic clock (never jumps with the wall clock).
func monotonicSeconds() -> Double {
    var t = timespec()
    clock_gettime(CLOCK_MONOTONIC, &t)
    return Double(t.tv_sec) + Double(t.tv_nsec) * 1e-9
}

/// "5" for whole seconds, "0.5" otherwise: durations in messages.
func secondsText(_ s: Double) -> String {
    s == s.rounded() && abs(s) < 1e15 ? String(Int(s)) : String(format: "%.3g", s)
}

/// A connected TCP socket sending and receiving frames. Every blocking wait is bounded:
/// - `timeout`: the longest any single wait for bytes (to receive, or room to send) may take;
/// - `frameTimeout`: once the first byte of a frame has arrived, the whole frame (header and
///   payload) must arrive within this, so a peer that trickles bytes cannot hold a reader;
/// - `deadline`: an absolute limit on everything (the handshake runs under one).
public final class Connection: @unchecked Sendable {
    public let peer: String
    private let fd: Int32
    private var closed = false
    private let closeLock = NSLock()
    /// The frame checks (header, then payload CRC): the same `FrameDecoder` checks that
    /// byte-stream decoding and the fuzz targets run.
    private var decoder: FrameDecoder
    /// Frames larger than this are refused from their header.
    public var maxFrameBytes: Int {
        get { decoder.maxFrameBytes }
        set { decoder.maxFrameBytes = newValue }
    }
    /// When set, frames of other types are refused from their header (during the handshake).
    public var allowedTypes: Set<MessageType>? {
        get { decoder.allowedTypes }
        set { decoder.allowedTypes = newValue }
    }
    private var payloadBuffer: [UInt8] = []
    /// Seconds a single wait for bytes (or for room to send them) may take before failing.
    public var timeout: Double
    /// Seconds a frame may take from its first byte to its last.
    public var frameTimeout: Double = 120
    /// Tensors announced larger than this are refused from their header, before any allocation
    /// (callers that know the expected shape check it exactly; this is the bound for the rest).
    public var maxTensorBytes: Int = 4 << 30
    /// A monotonic time (`monotonicSeconds()`) after which every wait fails, and what it limits.
    private var deadline: (at: Double, what: String, seconds: Double)?
    private var frameDeadline: Double?

    init(fd: Int32, peer: String, timeout: Double, maxFrameBytes: Int) {
        self.fd = fd
        self.peer = peer
        self.timeout = timeout
        self.decoder = FrameDecoder(maxFrameBytes: maxFrameBytes)
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        // A peer that vanishes without a FIN (a dead host) is found by TCP keepalive, not only
        // by the timeouts above.
        setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, socklen_t(MemoryLayout<Int32>.size))
        var size: Int32 = 4 << 20
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
    }

    deinit { close() }

    public func close() {
        closeLock.lock()
        defer { closeLock.unlock() }
        if !closed {
            closed = true
            Glibc.close(fd)
        }
    }

    /// Shuts the socket down (both directions) without closing its descriptor: safe from another
    /// thread; a thread waiting on the connection wakes and fails with "connection closed".
    public func shutdownSocket() {
        closeLock.lock()
        defer { closeLock.unlock() }
        if !closed { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }
    }

    /// Sets an absolute limit of `seconds` from now on every wait of this connection (nil clears
    /// it); `what` names what is limited in the error ("the handshake").
    public func setDeadline(_ seconds: Double?, for what: String = "the exchange") {
        deadline = seconds.map { (monotonicSeconds() + $0, what, $0) }
    }

    /// Opens a connection to `endpoint`, trying each resolved address, within `timeout` seconds.
    public static func connect(to endpoint: Endpoint, timeout: Double = 10, maxFrameBytes: Int = Protocol.defaultMaxFrameBytes) throws -> Connection {
        var lastError = "no address"
        for a in try endpoint.resolve() {
            defer { a.ai_addr.deallocate() }
            let fd = socket(a.ai_family, a.ai_socktype, a.ai_protocol)
            if fd < 0 { lastError = errnoText(); continue }
            let flags = fcntl(fd, F_GETFL)
            _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK)
            var rc = Glibc.connect(fd, a.ai_addr, a.ai_addrlen)
            if rc != 0 && errno == EINPROGRESS {
                var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                let end = monotonicSeconds() + max(0, timeout)
                var ready: Int32 = -1
                repeat {
                    p.revents = 0
                    ready = poll(&p, 1, pollMilliseconds(end - monotonicSeconds()))
                } while ready < 0 && errno == EINTR
                if ready == 1 {
                    var err: Int32 = 0
                    var len = socklen_t(MemoryLayout<Int32>.size)
                    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len)
                    if err != 0 { errno = err; rc = -1 } else { rc = 0 }
                } else {
                    if ready == 0 { errno = ETIMEDOUT }
                    rc = -1
                }
            }
            if rc != 0 { lastError = errnoText(); Glibc.close(fd); continue }
            _ = fcntl(fd, F_SETFL, flags)
            return Connection(fd: fd, peer: endpoint.description, timeout: timeout, maxFrameBytes: maxFrameBytes)
        }
        throw WireError.connection("\(endpoint): cannot connect: \(lastError)")
    }

    /// Limits what the next frames may be (handshake) and how big.
    public func restrict(to types: Set<MessageType>?, maxFrameBytes: Int) {
        allowedTypes = types
        self.maxFrameBytes = maxFrameBytes
    }

    public func send(_ message: Message) throws {
        try sendBytes(message.frame().encoded(), what: "sending a \(message.type) message")
    }

    func sendBytes(_ bytes: [UInt8], what: String = "sending") throws {
        try bytes.withUnsafeBytes { try sendBytes($0, what: what) }
    }

    /// Waits until the socket is readable (`POLLIN`) or writable (`POLLOUT`), within every limit
    /// that applies; the error names the limit that ran out and what was awaited.
    private func wait(for events: Int16, what: String) throws {
        while true {
            let now = monotonicSeconds()
            var limit = max(0, timeout)
            var failure = events == Int16(POLLIN)
                ? "no data for \(secondsText(timeout)) s (waiting for \(what))"
                : "no progress for \(secondsText(timeout)) s \(what): the peer is not reading"
            if events == Int16(POLLIN), let f = frameDeadline, f - now < limit {
                limit = f - now
                failure = "a frame did not arrive complete within \(secondsText(frameTimeout)) s (waiting for \(what))"
            }
            if let d = deadline, d.at - now < limit {
                limit = d.at - now
                failure = "\(d.what) did not complete within \(secondsText(d.seconds)) s (\(events == Int16(POLLIN) ? "waiting for" : "while") \(what))"
            }
            if limit <= 0 { throw WireError.connection("\(peer): \(failure)") }
            var p = pollfd(fd: fd, events: events, revents: 0)
            let ready = poll(&p, 1, pollMilliseconds(limit))
            if ready < 0 {
                if errno == EINTR { continue }
                throw WireError.connection("\(peer): poll failed: \(errnoText())")
            }
            if ready == 0 { throw WireError.connection("\(peer): \(failure)") }
            return
        }
    }

    /// Reads exactly `count` bytes into `p` within the connection's limits. `atFrameStart`: the
    /// peer closing before the first byte is a plain "connection closed".
    func readExact(_ p: UnsafeMutableRawPointer, _ count: Int, what: String, atFrameStart: Bool = false) throws {
        guard !closed else { throw WireError.connection("\(peer): connection closed") }
        var done = 0
        while done < count {
            try wait(for: Int16(POLLIN), what: what)
            let n = Glibc.recv(fd, p + done, count - done, Int32(MSG_DONTWAIT))
            if n < 0 {
                if errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK { continue }
                throw WireError.connection("\(peer): receive failed: \(errnoText())")
            }
            if n == 0 {
                if done == 0 && atFrameStart { throw WireError.connection("\(peer): connection closed") }
                throw WireError.truncated(what: "\(what) from \(peer) (connection closed)", needed: count, available: done)
            }
            done += n
            WireTraffic.count(received: n)
        }
    }

    /// The next frame's header, checked (magic, version, type, size) before any payload is read.
    /// From its first byte on, the frame runs under `frameTimeout`.
    func receiveHeader() throws -> FrameHeader {
        var raw = [UInt8](repeating: 0, count: FrameHeader.size)
        frameDeadline = nil
        try raw.withUnsafeMutableBytes { b in
            try readExact(b.baseAddress!, 1, what: decoder.expectedMessage, atFrameStart: true)
            frameDeadline = monotonicSeconds() + frameTimeout
            try readExact(b.baseAddress! + 1, FrameHeader.size - 1, what: "frame header")
        }
        return try raw.withUnsafeBytes { try decoder.checkHeader($0) }
    }

    /// Reads a frame's payload into the connection's buffer and checks its CRC.
    func receivePayload(_ h: FrameHeader) throws -> UnsafeRawBufferPointer {
        let n = Int(h.length)
        if payloadBuffer.count < n { payloadBuffer = [UInt8](repeating: 0, count: n) }
        try payloadBuffer.withUnsafeMutableBytes { try readExact($0.baseAddress!, n, what: "payload of a \(MessageType(rawValue: h.type)!) message") }
        let bytes = payloadBuffer.withUnsafeBytes { UnsafeRawBufferPointer(rebasing: $0[0..<n]) }
        try FrameDecoder.checkPayload(bytes, of: h)
        return bytes
    }

    /// The next message.
    public func receive() throws -> Message {
        let h = try receiveHeader()
        let payload = try receivePayload(h)
        return try Message.decode(Frame(type: MessageType(rawValue: h.type)!, flags: h.flags, payload: Array(payload)))
    }

    /// Authenticates as the connecting side; with `within`, the whole handshake must complete in
    /// that many seconds (an error names the handshake and what was awaited).
    public func authenticate(secret: SharedSecret, name: String, role: UInt8, within seconds: Double? = nil) throws -> String {
        var h = ConnectorHandshake(secret: secret, name: name, role: role)
        let saved = maxFrameBytes
        if let seconds { setDeadline(seconds, for: "the handshake") }
        defer { setDeadline(nil) }
        try send(h.start())
        while h.state != .authenticated {
            restrict(to: h.expected, maxFrameBytes: Protocol.maxHandshakeFrameBytes)
            for reply in try h.receive(try receive()) { try send(reply) }
        }
        restrict(to: nil, maxFrameBytes: saved)
        return h.peerName
    }

    /// Authenticates as the listening side; with `within`, the whole handshake must complete in
    /// that many seconds. A failure sends an error message (waiting at most a second for the
    /// peer to take it) and closes.
    public func acceptHandshake(secret: SharedSecret, name: String, within seconds: Double? = nil) throws -> String {
        var h = ListenerHandshake(secret: secret, name: name)
        let saved = maxFrameBytes
        if let seconds { setDeadline(seconds, for: "the handshake") }
        defer { setDeadline(nil) }
        do {
            while h.state != .authenticated {
                restrict(to: h.expected, maxFrameBytes: Protocol.maxHandshakeFrameBytes)
                for reply in try h.receive(try receive()) { try send(reply) }
            }
        } catch {
            setDeadline(1, for: "sending the refusal")
            try? send(.error(code: 401, message: "\(error)"))
            close()
            throw error
        }
        restrict(to: nil, maxFrameBytes: saved)
        return h.peerName
    }

    /// Sends a matrix as a tensor header and chunks (`TensorStream`'s), straight from its
    /// storage (f32) or through one reusable conversion buffer (f16, bf16).
    public func sendTensor(_ m: Matrix, name: String, stream: UInt32, dtype: WireDType = .f32, chunkBytes: Int = 16 << 20) throws {
        try send(.tensorHeader(stream: stream, name: name, dtype: dtype, shape: [m.rows, m.cols], byteCount: UInt64(m.count * dtype.size)))
        let what = "sending tensor '\(name)'"
        try TensorStream.forEachChunk(m, dtype: dtype, chunkBytes: chunkBytes) { offset, data in
            try sendBytes(TensorStream.chunkFramePrefix(stream: stream, offset: offset, data: data), what: what)
            try sendBytes(data, what: what)
        }
    }

    /// Sends all of `data` within the connection's limits (a peer that stops reading fails the
    /// send after `timeout`, it does not block it forever).
    func sendBytes(_ data: UnsafeRawBufferPointer, what: String = "sending") throws {
        guard !closed else { throw WireError.connection("\(peer): connection closed") }
        var done = 0
        while done < data.count {
            let n = Glibc.send(fd, data.baseAddress! + done, data.count - done, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT))
            if n < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN || errno == EWOULDBLOCK {
                    try wait(for: Int16(POLLOUT), what: what)
                    continue
                }
                throw WireError.connection("\(peer): send failed: \(errnoText())")
            }
            done += n
            WireTraffic.count(sent: n)
        }
    }

    /// Plain bytes without framing, for the transfer benchmark's baseline (and tests).
    public func sendRawForBenchmark(_ bytes: [UInt8]) throws { try sendBytes(bytes) }

    /// Reads exactly `buffer.count` plain bytes, for the transfer benchmark's baseline.
    public func receiveRawForBenchmark(into buffer: inout [UInt8]) throws {
        let n = buffer.count
        frameDeadline = nil
        try buffer.withUnsafeMutableBytes { try readExact($0.baseAddress!, n, what: "raw bytes") }
    }

    /// The header of the next tensor, decoded and checked (its shape against its byte count);
    /// nothing is allocated for it yet, so the caller can check the name and shape it expects
    /// first. `receiveTensorBody` refuses a tensor over `maxTensorBytes`.
    public func receiveTensorHeader() throws -> TensorAnnouncement {
        let message = try receive()
        guard case .tensorHeader(let stream, let name, let dtype, let shape, let byteCount) = message else {
            throw WireError.unexpectedMessage(expected: "tensor-header", found: message.type.description)
        }
        return TensorAnnouncement(stream: stream, name: name, dtype: dtype, shape: shape, byteCount: byteCount)
    }

    /// The next frame's header, which must be a tensor chunk's with room for its prefix.
    private func receiveChunkHeader() throws -> FrameHeader {
        let h = try receiveHeader()
        guard h.type == MessageType.tensorChunk.rawValue else {
            throw WireError.unexpectedMessage(expected: "tensor-chunk", found: MessageType(rawValue: h.type)!.description)
        }
        let p = TensorStream.chunkPrefixBytes
        guard h.length >= UInt64(p) else { throw WireError.truncated(what: "tensor-chunk message, field 'offset'", needed: p, available: Int(h.length)) }
        return h
    }

    /// Receives an announced tensor's chunks into a matrix. f32 chunks are read straight into the
    /// tensor's storage and checksummed there; f16/bf16 chunks are decoded from the receive buffer.
    public func receiveTensorBody(_ a: TensorAnnouncement) throws -> Matrix {
        var assembler = try TensorAssembler(header: a.message, maxBytes: maxTensorBytes)
        // The sender sends at least one chunk, also for an empty tensor.
        repeat {
            let h = try receiveChunkHeader()
            if assembler.dtype == .f32 {
                let p = TensorStream.chunkPrefixBytes
                var prefix = [UInt8](repeating: 0, count: p)
                try prefix.withUnsafeMutableBytes { try readExact($0.baseAddress!, p, what: "tensor-chunk prefix") }
                let (stream, offset) = try prefix.withUnsafeBytes { raw in
                    var c = ByteCursor(raw, message: "tensor-chunk")
                    return try TensorStream.chunkPrefix(&c)
                }
                let computed = try assembler.receiveInPlace(stream: stream, offset: offset, byteCount: Int(h.length) - p,
                                                            prefixChecksum: CRC32C.checksum(prefix)) { region in
                    if region.count > 0 { try readExact(region.baseAddress!, region.count, what: "tensor-chunk payload") }
                }
                try FrameDecoder.checkPayload(checksum: computed, of: h)
            } else {
                let payload = try receivePayload(h)
                var r = ByteCursor(payload, message: "tensor-chunk")
                let (stream, offset) = try TensorStream.chunkPrefix(&r)
                try assembler.add(stream: stream, offset: offset, bytes: try r.raw(r.remaining, "bytes"))
            }
        } while !assembler.isComplete
        return try assembler.matrix()
    }

    /// Reads an announced tensor's chunks and keeps nothing (a refused job's tensors are drained
    /// so that the connection stays in step): the chunks are still checked (stream, offsets,
    /// sizes, CRC), and memory stays one frame whatever the announced size.
    public func skipTensorBody(_ a: TensorAnnouncement) throws {
        var order = TensorChunkOrder(a)
        repeat {
            let payload = try receivePayload(try receiveChunkHeader())
            var r = ByteCursor(payload, message: "tensor-chunk")
            let (stream, offset) = try TensorStream.chunkPrefix(&r)
            try order.accept(stream: stream, offset: offset, byteCount: r.remaining)
        } while !order.isComplete
    }

    /// Receives one tensor (header, then chunks); `check` sees the header before anything is
    /// allocated for the tensor, and refuses it by throwing.
    public func receiveTensor(check: (TensorAnnouncement) throws -> Void = { _ in }) throws -> (name: String, matrix: Matrix) {
        let a = try receiveTensorHeader()
        try check(a)
        return (a.name, try receiveTensorBody(a))
    }
}

/// A tensor-header message: what a tensor will be, before its bytes arrive.
public struct TensorAnnouncement: Sendable, Equatable {
    public var stream: UInt32
    public var name: String
    public var dtype: WireDType
    public var shape: [Int]
    public var byteCount: UInt64

    public init(stream: UInt32, name: String, dtype: WireDType, shape: [Int], byteCount: UInt64) {
        self.stream = stream
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.byteCount = byteCount
    }

    public var message: Message { .tensorHeader(stream: stream, name: name, dtype: dtype, shape: shape, byteCount: byteCount) }
    /// The shape as text, "64x512".
    public var shapeText: String { shape.map(String.init).joined(separator: "x") }
}

/// Milliseconds for poll: rounded up, at most Int32.max, never negative.
func pollMilliseconds(_ seconds: Double) -> Int32 {
    guard seconds > 0 else { return 0 }
    return Int32(min(Double(Int32.max), (seconds * 1000).rounded(.up)))
}

/// A listening TCP socket.
public final class Listener: @unchecked Sendable {
    public let endpoint: Endpoint
    private let fd: Int32

    /// Binds `endpoint` (port 0 picks a free port; `endpoint.port` then holds it).
    public init(endpoint: Endpoint) throws {
        var bound: Endpoint?
        var fdOut: Int32 = -1
        var lastError = "no address"
        for a in try endpoint.resolve() {
            defer { a.ai_addr.deallocate() }
            let fd = socket(a.ai_family, a.ai_socktype, a.ai_protocol)
            if fd < 0 { lastError = errnoText(); continue }
            var one: Int32 = 1
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            if bind(fd, a.ai_addr, a.ai_addrlen) != 0 || listen(fd, 64) != 0 {
                lastError = errnoText()
                Glibc.close(fd)
                continue
            }
            var storage = sockaddr_storage()
            var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
            let port: UInt16 = withUnsafeMutablePointer(to: &storage) { p in
                _ = p.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
                if Int32(p.pointee.ss_family) == AF_INET6 {
                    return p.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin6_port) }
                }
                return p.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin_port) }
            }
            bound = Endpoint(host: endpoint.host, port: port)
            fdOut = fd
            break
        }
        guard let bound else { throw WireError.connection("\(endpoint): cannot listen: \(lastError)") }
        self.endpoint = bound
        fd = fdOut
    }

    deinit { Glibc.close(fd) }

    /// Waits up to `timeout` seconds (nil: forever) for a connection.
    public func accept(timeout: Double? = nil, connectionTimeout: Double = 60, maxFrameBytes: Int = Protocol.defaultMaxFrameBytes) throws -> Connection? {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let ready = poll(&p, 1, timeout.map { Int32($0 * 1000) } ?? -1)
        if ready <= 0 { return nil }
        var storage = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let client = withUnsafeMutablePointer(to: &storage) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.accept(fd, $0, &len) }
        }
        guard client >= 0 else { throw WireError.connection("\(endpoint): accept failed: \(errnoText())") }
        var host = [CChar](repeating: 0, count: Int(NI_MAXHOST))
        var serv = [CChar](repeating: 0, count: Int(NI_MAXSERV))
        _ = withUnsafePointer(to: &storage) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                getnameinfo($0, len, &host, socklen_t(host.count), &serv, socklen_t(serv.count), NI_NUMERICHOST | NI_NUMERICSERV)
            }
        }
        func text(_ chars: [CChar]) -> String { String(decoding: chars.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) }
        return Connection(fd: client, peer: "\(text(host)):\(text(serv))", timeout: connectionTimeout, maxFrameBytes: maxFrameBytes)
    }
}
