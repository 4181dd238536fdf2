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

func errnoText() -> String { String(cString: strerror(errno)) }

/// A connected TCP socket sending and receiving frames, with timeouts on every blocking wait.
public final class Connection: @unchecked Sendable {
    public let peer: String
    private let fd: Int32
    private var closed = false
    /// Frames larger than this are refused from their header.
    public var maxFrameBytes: Int
    /// When set, frames of other types are refused from their header (during the handshake).
    public var allowedTypes: Set<MessageType>?
    private var payloadBuffer: [UInt8] = []
    /// Seconds a receive may wait for bytes before failing.
    public var timeout: Double

    init(fd: Int32, peer: String, timeout: Double, maxFrameBytes: Int) {
        self.fd = fd
        self.peer = peer
        self.timeout = timeout
        self.maxFrameBytes = maxFrameBytes
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        var size: Int32 = 4 << 20
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
    }

    deinit { close() }

    public func close() {
        if !closed {
            closed = true
            Glibc.close(fd)
        }
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
                rc = poll(&p, 1, Int32(timeout * 1000)) == 1 ? 0 : -1
                if rc == 0 {
                    var err: Int32 = 0
                    var len = socklen_t(MemoryLayout<Int32>.size)
                    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len)
                    if err != 0 { errno = err; rc = -1 }
                } else if errno == 0 { errno = ETIMEDOUT }
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
        try sendBytes(message.frame().encoded())
    }

    func sendBytes(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try sendBytes($0) }
    }

    /// Reads exactly `count` bytes into `p`, waiting at most `timeout` seconds for each piece.
    func readExact(_ p: UnsafeMutableRawPointer, _ count: Int, what: String) throws {
        guard !closed else { throw WireError.connection("\(peer): connection closed") }
        var done = 0
        while done < count {
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&pfd, 1, Int32(timeout * 1000))
            if ready < 0 && errno == EINTR { continue }
            if ready == 0 { throw WireError.connection("\(peer): no data for \(timeout) s (waiting for \(what))") }
            let n = Glibc.recv(fd, p + done, count - done, 0)
            if n < 0 {
                if errno == EINTR { continue }
                throw WireError.connection("\(peer): receive failed: \(errnoText())")
            }
            if n == 0 {
                if done == 0 && what == "frame header" { throw WireError.connection("\(peer): connection closed") }
                throw WireError.truncated(what: "\(what) from \(peer) (connection closed)", needed: count, available: done)
            }
            done += n
        }
    }

    /// The next frame's header, checked (magic, version, type, size) before any payload is read.
    func receiveHeader() throws -> FrameHeader {
        var raw = [UInt8](repeating: 0, count: FrameHeader.size)
        try raw.withUnsafeMutableBytes { try readExact($0.baseAddress!, FrameHeader.size, what: "frame header") }
        let h = try raw.withUnsafeBytes { try FrameHeader.decode($0, supported: Protocol.supportedVersions, limit: maxFrameBytes) }
        if let allowed = allowedTypes, let type = MessageType(rawValue: h.type), !allowed.contains(type) {
            throw WireError.unexpectedMessage(expected: allowed.map(\.description).sorted().joined(separator: " or "), found: type.description)
        }
        return h
    }

    /// Reads a frame's payload into the connection's buffer and checks its CRC.
    func receivePayload(_ h: FrameHeader) throws -> UnsafeRawBufferPointer {
        let n = Int(h.length)
        if payloadBuffer.count < n { payloadBuffer = [UInt8](repeating: 0, count: n) }
        try payloadBuffer.withUnsafeMutableBytes { try readExact($0.baseAddress!, n, what: "payload of a \(MessageType(rawValue: h.type)!) message") }
        let bytes = payloadBuffer.withUnsafeBytes { UnsafeRawBufferPointer(rebasing: $0[0..<n]) }
        let computed = CRC32C.checksum(bytes)
        guard computed == h.checksum else { throw WireError.badChecksum(type: h.type, expected: h.checksum, computed: computed) }
        return bytes
    }

    /// The next message.
    public func receive() throws -> Message {
        let h = try receiveHeader()
        let payload = try receivePayload(h)
        return try Message.decode(Frame(type: MessageType(rawValue: h.type)!, flags: h.flags, payload: Array(payload)))
    }

    /// Authenticates as the connecting side.
    public func authenticate(secret: SharedSecret, name: String, role: UInt8) throws -> String {
        var h = ConnectorHandshake(secret: secret, name: name, role: role)
        let saved = maxFrameBytes
        try send(h.start())
        while h.state != .authenticated {
            restrict(to: h.expected, maxFrameBytes: Protocol.maxHandshakeFrameBytes)
            for reply in try h.receive(try receive()) { try send(reply) }
        }
        restrict(to: nil, maxFrameBytes: saved)
        return h.peerName
    }

    /// Authenticates as the listening side; a failure sends an error message and closes.
    public func acceptHandshake(secret: SharedSecret, name: String) throws -> String {
        var h = ListenerHandshake(secret: secret, name: name)
        let saved = maxFrameBytes
        do {
            while h.state != .authenticated {
                restrict(to: h.expected, maxFrameBytes: Protocol.maxHandshakeFrameBytes)
                for reply in try h.receive(try receive()) { try send(reply) }
            }
        } catch {
            try? send(.error(code: 401, message: "\(error)"))
            close()
            throw error
        }
        restrict(to: nil, maxFrameBytes: saved)
        return h.peerName
    }

    /// Sends a matrix as a tensor header and chunks, straight from its storage (f32) or through
    /// one reusable conversion buffer (f16, bf16).
    public func sendTensor(_ m: Matrix, name: String, stream: UInt32, dtype: WireDType = .f32, chunkBytes: Int = 16 << 20) throws {
        let total = m.count * dtype.size
        try send(.tensorHeader(stream: stream, name: name, dtype: dtype, shape: [m.rows, m.cols], byteCount: UInt64(total)))
        let chunk = max(dtype.size, chunkBytes / dtype.size * dtype.size)
        var converted = dtype == .f32 ? [] : [UInt8](repeating: 0, count: min(chunk, total))
        try m.withUnsafeBufferPointer { values in
            var offset = 0
            repeat {
                let n = min(chunk, total - offset)
                let data: UnsafeRawBufferPointer
                if dtype == .f32 {
                    data = UnsafeRawBufferPointer(start: UnsafeRawPointer(values.baseAddress!) + offset, count: n)
                } else {
                    converted.withUnsafeMutableBytes { out in
                        TensorStream.writeHalf(UnsafeBufferPointer(rebasing: values[(offset / 2)..<(offset / 2 + n / 2)]), dtype: dtype, into: out)
                    }
                    data = converted.withUnsafeBytes { UnsafeRawBufferPointer(rebasing: $0[0..<n]) }
                }
                var prefix = ByteWriter()
                prefix.u32(stream)
                prefix.u64(UInt64(offset))
                let crc = prefix.data.withUnsafeBytes { p in CRC32C.checksum(data, continuing: CRC32C.checksum(p)) }
                let header = FrameHeader(version: Protocol.version, type: MessageType.tensorChunk.rawValue, flags: 0,
                                         length: UInt64(prefix.data.count + n), checksum: crc)
                try sendBytes(header.encoded() + prefix.data)
                try sendBytes(data)
                offset += n
            } while offset < total
        }
    }

    func sendBytes(_ data: UnsafeRawBufferPointer) throws {
        guard !closed else { throw WireError.connection("\(peer): connection closed") }
        var done = 0
        while done < data.count {
            let n = Glibc.send(fd, data.baseAddress! + done, data.count - done, Int32(MSG_NOSIGNAL))
            if n < 0 {
                if errno == EINTR { continue }
                throw WireError.connection("\(peer): send failed: \(errnoText())")
            }
            done += n
        }
    }

    /// Plain bytes without framing, for the transfer benchmark's baseline.
    public func sendRawForBenchmark(_ bytes: [UInt8]) throws { try sendBytes(bytes) }

    /// Reads exactly `buffer.count` plain bytes, for the transfer benchmark's baseline.
    public func receiveRawForBenchmark(into buffer: inout [UInt8]) throws {
        let n = buffer.count
        try buffer.withUnsafeMutableBytes { try readExact($0.baseAddress!, n, what: "raw bytes") }
    }

    /// Receives one tensor (header, then chunks). f32 chunks are read straight into the
    /// tensor's storage and checksummed there; f16/bf16 chunks are decoded from the receive buffer.
    public func receiveTensor() throws -> (name: String, matrix: Matrix) {
        var assembler = try TensorAssembler(header: try receive())
        while !assembler.isComplete {
            let h = try receiveHeader()
            guard h.type == MessageType.tensorChunk.rawValue else {
                throw WireError.unexpectedMessage(expected: "tensor-chunk", found: MessageType(rawValue: h.type)!.description)
            }
            guard h.length >= 12 else { throw WireError.truncated(what: "tensor-chunk message, field 'offset'", needed: 12, available: Int(h.length)) }
            if assembler.dtype == .f32 {
                var prefix = [UInt8](repeating: 0, count: 12)
                try prefix.withUnsafeMutableBytes { try readExact($0.baseAddress!, 12, what: "tensor-chunk prefix") }
                let (stream, offset) = try prefix.withUnsafeBytes { raw -> (UInt32, UInt64) in
                    var c = ByteCursor(raw, message: "tensor-chunk")
                    return (try c.u32("stream"), try c.u64("offset"))
                }
                let computed = try assembler.receiveInPlace(stream: stream, offset: offset, byteCount: Int(h.length) - 12,
                                                            prefixChecksum: CRC32C.checksum(prefix)) { region in
                    if region.count > 0 { try readExact(region.baseAddress!, region.count, what: "tensor-chunk payload") }
                }
                guard computed == h.checksum else { throw WireError.badChecksum(type: h.type, expected: h.checksum, computed: computed) }
            } else {
                let payload = try receivePayload(h)
                var r = ByteCursor(payload, message: "tensor-chunk")
                let stream = try r.u32("stream"), offset = try r.u64("offset")
                try assembler.add(stream: stream, offset: offset, bytes: try r.raw(r.remaining, "bytes"))
            }
        }
        return (assembler.name, try assembler.matrix())
    }
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
