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
    private var decoder: FrameDecoder
    private var closed = false
    /// Seconds a receive may wait for bytes before failing.
    public var timeout: Double

    init(fd: Int32, peer: String, timeout: Double, maxFrameBytes: Int) {
        self.fd = fd
        self.peer = peer
        self.timeout = timeout
        decoder = FrameDecoder(maxFrameBytes: maxFrameBytes)
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
        decoder.allowedTypes = types
        decoder.maxFrameBytes = maxFrameBytes
    }

    public func send(_ message: Message) throws {
        try sendBytes(message.frame().encoded())
    }

    func sendBytes(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { raw in
            var done = 0
            while done < raw.count {
                let n = Glibc.send(fd, raw.baseAddress! + done, raw.count - done, Int32(MSG_NOSIGNAL))
                if n < 0 {
                    if errno == EINTR { continue }
                    throw WireError.connection("\(peer): send failed: \(errnoText())")
                }
                done += n
            }
        }
    }

    /// The next message; waits at most `timeout` seconds for each piece of it.
    public func receive() throws -> Message {
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        while true {
            if let frame = try decoder.next() { return try Message.decode(frame) }
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&p, 1, Int32(timeout * 1000))
            if ready < 0 && errno == EINTR { continue }
            if ready == 0 { throw WireError.connection("\(peer): no data for \(timeout) s") }
            let want = min(buffer.count, max(decoder.bytesWanted, 1 << 16))
            let n = buffer.withUnsafeMutableBytes { Glibc.recv(fd, $0.baseAddress!, want, 0) }
            if n < 0 {
                if errno == EINTR { continue }
                throw WireError.connection("\(peer): receive failed: \(errnoText())")
            }
            if n == 0 {
                if decoder.bufferedBytes > 0 {
                    throw WireError.truncated(what: "frame from \(peer) (connection closed mid-frame)", needed: decoder.bytesWanted + decoder.bufferedBytes, available: decoder.bufferedBytes)
                }
                throw WireError.connection("\(peer): connection closed")
            }
            buffer.withUnsafeBytes { decoder.append(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
        }
    }

    /// Authenticates as the connecting side.
    public func authenticate(secret: SharedSecret, name: String, role: UInt8) throws -> String {
        var h = ConnectorHandshake(secret: secret, name: name, role: role)
        let saved = decoder.maxFrameBytes
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
        let saved = decoder.maxFrameBytes
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

    /// Sends a matrix as a tensor header and chunks.
    public func sendTensor(_ m: Matrix, name: String, stream: UInt32, dtype: WireDType = .f32, chunkBytes: Int = 16 << 20) throws {
        for message in TensorStream.messages(m, name: name, dtype: dtype, stream: stream, chunkBytes: chunkBytes) { try send(message) }
    }

    /// Receives one tensor (header, then chunks).
    public func receiveTensor() throws -> (name: String, matrix: Matrix) {
        var assembler = try TensorAssembler(header: try receive())
        while !assembler.isComplete { try assembler.add(try receive()) }
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
                p.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
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
        return Connection(fd: client, peer: "\(String(cString: host)):\(String(cString: serv))", timeout: connectionTimeout, maxFrameBytes: maxFrameBytes)
    }
}
