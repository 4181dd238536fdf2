import XCTest
import TopiaryTensor
import TopiaryTestSupport
@testable import TopiaryPrune

/// `--weight-update admm` (ADMMPruner) against small dense references.
final class ADMMTests: XCTestCase {
    let backend = CPUBackend()

    /// tr((Ŵ − W) H (Ŵ − W)ᵀ) in Double on the host.
    func objective(_ pruned: Matrix, _ weight: Matrix, _ h: Matrix) -> Double {
        var total = 0.0
        for r in 0..<weight.rows {
            let e = (0..<weight.cols).map { Double(pruned[r, $0]) - Double(weight[r, $0]) }
            for i in 0..<weight.cols where e[i] != 0 {
                for j in 0..<weight.cols where e[j] != 0 { total += e[i] * Double(h[i, j]) * e[j] }
            }
        }
        return total
    }

    func admm(_ w: Matrix, _ h: Matrix, _ pattern: SparsityPattern, _ options: ADMMPruner.Options = .init(),
              percentDamp: Double = 0.01, fixedMask: Matrix? = nil) throws -> Matrix {
        let r = try ADMMPruner.prune(backend.upload(w), hessian: backend.upload(h), pattern: pattern, percentDamp: percentDamp,
                                     options: options, what: "test", fixedMask: fixedMask.map { backend.upload($0) }, on: backend)
        return backend.download(r.weight)
    }

    /// Under a fixed mask the problem is convex: ADMM must approach the least-squares optimum of
    /// the kept weights, which each row gets from its own reduced normal equations (in Double, with
    /// the same 1% damping): the objective within 0.1% of the optimum's, for 200 refit iterations
    /// and for the default 20.
    func testFixedMaskApproachesTheLeastSquaresOptimum() throws {
        let problem = Problem(rows: 6, cols: 24, tokens: 400, seed: 21)
        let w = problem.weight
        var h = problem.stats.hessian
        let damp = 0.01 * (0..<24).reduce(0.0) { $0 + Double(h[$1, $1]) } / 24
        var rng = Random(3)
        let mask = Matrix(rows: 6, cols: 24, values: (0..<144).map { _ in rng.next() < 0 ? 1 : 0 })
        let mild = try admm(w, h, .unstructured(0.5), .init(refitIterations: 200), fixedMask: mask)
        let standard = try admm(w, h, .unstructured(0.5), .init(), fixedMask: mask)
        for j in 0..<24 { h[j, j] += Float(damp) }
        var optimum = Matrix(rows: 6, cols: 24)
        for r in 0..<6 {
            let kept = (0..<24).filter { mask[r, $0] == 0 }
            for c in 0..<24 where mask[r, c] != 0 { XCTAssertEqual(mild[r, c], 0); XCTAssertEqual(standard[r, c], 0) }
            // H_SS v = (w H)_S: the gradient of (v − w) H (v − w)ᵀ vanishes on the kept set.
            let a = kept.map { i in kept.map { j in Double(h[i, j]) } }
            let b = kept.map { i in (0..<24).reduce(0.0) { $0 + Double(w[r, $1]) * Double(h[$1, i]) } }
            let v = SolverTests.solve(a, b)
            for (k, c) in kept.enumerated() { optimum[r, c] = Float(v[k]) }
        }
        let best = objective(optimum, w, h)
        XCTAssertLessThan(objective(mild, w, h), best * 1.001, "optimum \(best)")
        XCTAssertLessThan(objective(standard, w, h), best * 1.001, "optimum \(best), mild \(objective(mild, w, h))")
    }

    /// On a correlated problem ADMM's mask and weights reconstruct better than SparseGPT's OBS loop
    /// at 50%, 70% and 2:4, with the pattern's exact counts.
    func testBeatsSparseGPTOnTheLayerObjective() throws {
        let problem = Problem(rows: 32, cols: 96, tokens: 1024, seed: 8)
        let (w, h) = (problem.weight, problem.stats.hessian)
        for pattern in [SparsityPattern.unstructured(0.5), .unstructured(0.7), .nOfM(n: 2, m: 4)] {
            let sgpt = try SparseGPTPruner.prune(w, hessian: h, pattern: pattern).weight
            let viaADMM = try admm(w, h, pattern)
            let (eo, ea) = (problem.error(sgpt), problem.error(viaADMM))
            XCTAssertLessThan(ea, 0.95 * eo, "\(pattern): ADMM \(ea) against OBS \(eo)")
            switch pattern {
            case .unstructured(let s):
                let counts = WandaPruner.rowCounts(rows: 32, cols: 96, fraction: s)
                for r in 0..<32 { XCTAssertEqual(viaADMM.rows(r..<(r + 1)).zeroCount, counts[r], "\(pattern) row \(r)") }
            case .nOfM(let n, let m):
                for r in 0..<32 { for g in stride(from: 0, to: 96, by: m) {
                    XCTAssertGreaterThanOrEqual((g..<(g + m)).filter { viaADMM[r, $0] == 0 }.count, n, "row \(r) group \(g)")
                } }
            }
            // And the objective it reports is the one it reached.
            let r = try ADMMPruner.prune(backend.upload(w), hessian: backend.upload(h), pattern: pattern, percentDamp: 0.01,
                                         options: .init(), what: "test", on: backend)
            XCTAssertEqual(backend.download(r.weight).values, viaADMM.values)
        }
    }

    /// The longest and steepest schedules the CLI allows (1000 iterations at growth 1.5; 100
    /// iterations at growth 100) overflowed ρ to infinity and failed; ρ now stops at 10^8 times
    /// the diagonal's mean, and the weights are finite, exactly sparse and near OBS's error.
    func testPenaltyStopsGrowingBeforeItOverflows() throws {
        let problem = Problem(rows: 8, cols: 32, tokens: 256, seed: 10)
        let (w, h) = (problem.weight, problem.stats.hessian)
        let sgpt = problem.error(try SparseGPTPruner.prune(w, hessian: h, pattern: .unstructured(0.5)).weight)
        for options in [ADMMPruner.Options(iterations: 1000), ADMMPruner.Options(iterations: 100, rhoGrowth: 100)] {
            let z = try admm(w, h, .unstructured(0.5), options)
            XCTAssertTrue(z.values.allSatisfy(\.isFinite), "\(options)")
            XCTAssertEqual(z.zeroCount, 8 * 16, "\(options)")
            XCTAssertLessThan(problem.error(z), 2 * sgpt, "\(options)")
        }
    }

    /// `SparseGPTPruner` hands over to ADMM when its options say so; bad settings are refused by name.
    func testSparseGPTOptionSelectsADMMAndBadSettingsAreRefused() throws {
        let problem = Problem(rows: 8, cols: 32, tokens: 256, seed: 9)
        let (w, h) = (problem.weight, problem.stats.hessian)
        let via = try SparseGPTPruner.prune(w, hessian: h, pattern: .nOfM(n: 2, m: 4), options: .init(admm: .init())).weight
        XCTAssertEqual(via.values, try admm(w, h, .nOfM(n: 2, m: 4)).values)
        XCTAssertThrowsError(try admm(w, h, .unstructured(0.5), .init(rho: 0))) { e in
            XCTAssertTrue("\(e)".contains("test: ADMM needs iterations >= 0"), "\(e)")
        }
        XCTAssertThrowsError(try ADMMPruner.prune(backend.upload(w), hessian: backend.upload(Matrix(rows: 3, cols: 3)), pattern: .unstructured(0.5),
                                                  percentDamp: 0.01, options: .init(), what: "layers.0.q_proj", on: backend)) { e in
            XCTAssertTrue("\(e)".contains("layers.0.q_proj: Hessian is 3x3, expected 32x32"), "\(e)")
        }
    }
}
