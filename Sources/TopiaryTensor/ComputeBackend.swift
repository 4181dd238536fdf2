/// The operations a solver or block needs from a compute device.
///
/// `CPUBackend` (OpenBLAS/LAPACKE) is the default and the reference; a CUDA backend loaded
/// at run time implements the same protocol.
public protocol ComputeBackend: Sendable {
    var name: String { get }
    /// op(A) * op(B).
    func matmul(_ a: Matrix, _ transA: Transpose, _ b: Matrix, _ transB: Transpose) -> Matrix
    /// C += alpha * Xᵀ X.
    func syrkAccumulate(_ x: Matrix, alpha: Float, into c: inout Matrix)
    /// Cholesky factor (upper: A = UᵀU; lower: A = LLᵀ).
    func cholesky(_ a: Matrix, upper: Bool, what: String) throws -> Matrix
    /// Inverse of a symmetric positive definite matrix.
    func inverseSPD(_ a: Matrix, what: String) throws -> Matrix
}

/// OpenBLAS and LAPACKE on the host.
public struct CPUBackend: ComputeBackend {
    public init() {}
    public var name: String { "cpu (OpenBLAS, \(Linalg.threadCount) threads)" }

    public func matmul(_ a: Matrix, _ transA: Transpose, _ b: Matrix, _ transB: Transpose) -> Matrix {
        Linalg.matmul(a, transA, b, transB)
    }

    public func syrkAccumulate(_ x: Matrix, alpha: Float, into c: inout Matrix) {
        Linalg.syrkAccumulate(x, alpha: alpha, into: &c)
    }

    public func cholesky(_ a: Matrix, upper: Bool, what: String) throws -> Matrix {
        try Linalg.cholesky(a, upper: upper, what: what)
    }

    public func inverseSPD(_ a: Matrix, what: String) throws -> Matrix {
        try Linalg.inverseSPD(a, what: what)
    }
}
