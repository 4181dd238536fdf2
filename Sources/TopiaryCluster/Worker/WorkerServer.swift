import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A worker's listening side: accepts connections and serves each on a thread of its own, so
/// that no peer, idle, slow or hostile, delays another.
///
/// - Until it has authenticated, a connection has `handshakeTimeout` seconds for the whole
///   handshake (not per read: a peer sending a byte a second is cut off all the same), and
///   frames of at most 4 KiB of the next handshake message type only.
/// - At most `maxPendingHandshakes` connections may be unauthenticated at once; one more
///   closes the oldest of them (a legitimate handshake takes milliseconds, so a flood of idle
///   connections cannot keep a coordinator out).
/// - An authenticated connection is served by `WorkerService` until it ends; its jobs compute
///   one at a time.
public final class WorkerServer: @unchecked Sendable {
    public let listener: Listener
    public let secret: SharedSecret
    public let service: WorkerService
    /// Seconds an unauthenticated connection has to complete the handshake.
    public var handshakeTimeout: Double = 10
    /// Connections that may be in their handshake at once.
    public var maxPendingHandshakes = 64
    /// Seconds an authenticated connection may stay silent between jobs (or stall a send).
    public var sessionTimeout: Double = 24 * 3600
    /// The largest tensor (stored as f32) a job may announce; a job whose tensors would be larger
    /// is refused before any of them is read.
    public var maxTensorBytes = 4 << 30
    /// Where the server reports connections that end with an error, and sessions that start.
    public var log: @Sendable (String) -> Void = { _ in }

    private let lock = NSLock()
    private var pending: [(id: Int, connection: Connection)] = []
    private var nextID = 0
    private var stopped = false
    private var activeSessions = 0

    public init(listener: Listener, secret: SharedSecret, service: WorkerService) {
        self.listener = listener
        self.secret = secret
        self.service = service
        service.peerSecret = secret
    }

    /// Connections now in their handshake, and authenticated sessions now served.
    public var counts: (pending: Int, sessions: Int) {
        lock.lock()
        defer { lock.unlock() }
        return (pending.count, activeSessions)
    }

    /// Accepts and serves connections until `stop()` (forever for `topiary worker`).
    public func run() {
        while !isStopped {
            let c: Connection
            do {
                guard let accepted = try listener.accept(timeout: 0.5, connectionTimeout: handshakeTimeout) else { continue }
                c = accepted
            } catch {
                // Out of descriptors, or a connection reset before accept: not the end of the worker.
                log("accept failed: \(error)")
                usleep(50_000)
                continue
            }
            let id = admit(c)
            let thread = Thread { [self] in handle(c, id: id) }
            thread.stackSize = 1 << 20
            thread.start()
        }
    }

    /// Starts `run()` on a thread of its own (tests).
    public func start() {
        Thread.detachNewThread { [self] in run() }
    }

    public func stop() {
        lock.lock()
        stopped = true
        lock.unlock()
    }

    private var isStopped: Bool {
        lock.lock()
        defer { lock.unlock() }
        return stopped
    }

    /// Records a new unauthenticated connection; over the limit, shuts the oldest one down.
    private func admit(_ c: Connection) -> Int {
        lock.lock()
        defer { lock.unlock() }
        nextID += 1
        pending.append((nextID, c))
        while pending.count > max(1, maxPendingHandshakes) {
            let oldest = pending.removeFirst()
            oldest.connection.shutdownSocket()
        }
        return nextID
    }

    /// Moves a connection out of the pending set; false when it was evicted meanwhile.
    private func authenticated(_ id: Int) -> Bool {
        lock.lock()
        defer { lock.unlock() }
        guard let k = pending.firstIndex(where: { $0.id == id }) else { return false }
        pending.remove(at: k)
        activeSessions += 1
        return true
    }

    private func forget(_ id: Int, session: Bool) {
        lock.lock()
        defer { lock.unlock() }
        pending.removeAll { $0.id == id }
        if session { activeSessions -= 1 }
    }

    private func handle(_ c: Connection, id: Int) {
        var session = false
        defer {
            forget(id, session: session)
            c.close()
        }
        do {
            c.timeout = handshakeTimeout
            let peer = try c.acceptHandshake(secret: secret, name: service.name, within: handshakeTimeout)
            guard authenticated(id) else {
                log("connection from \(c.peer) closed: too many unauthenticated connections")
                return
            }
            session = true
            c.timeout = sessionTimeout
            c.maxTensorBytes = maxTensorBytes
            log("serving \(peer) (\(c.peer))")
            try service.serve(c)
        } catch {
            log("connection from \(c.peer) ended: \(error)")
        }
    }
}
