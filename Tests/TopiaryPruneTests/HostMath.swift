import TopiaryTensor

/// Dense linear algebra on host matrices for the tests' reference computations, through the
/// CPU backend (the only code that reaches OpenBLAS and LAPACK).
enum HostMath {
    static let cpu = CPUBackend()

    static func matmul(_ a: Matrix, _ b: Matrix) -> Matrix { matmul(a, .none, b, .none) }

    static func matmul(_ a: Matrix, _ transA: Transpose, _ b: Matrix, _ transB: Transpose) -> Matrix {
        cpu.download(cpu.matmul(cpu.upload(a), transA, cpu.upload(b), transB))
    }

    /// x · Wᵀ.
    static func linear(_ x: Matrix, _ w: Matrix) -> Matrix { cpu.download(cpu.linear(cpu.upload(x), cpu.upload(w))) }

    static func solveSPDDouble(_ a: Matrix, _ b: Matrix) throws -> Matrix {
        cpu.download(try cpu.solveSPDDouble(cpu.upload(a), cpu.upload(b), what: "test"))
    }

    static func inverseSPDDouble(_ a: Matrix) throws -> Matrix { cpu.download(try cpu.inverseSPDDouble(cpu.upload(a), what: "test")) }

    static func cholesky(_ a: Matrix, upper: Bool) throws -> Matrix { cpu.download(try cpu.cholesky(cpu.upload(a), upper: upper, what: "test")) }
}
