import Foundation
@testable import TopiaryPrune
import TopiaryModel
import TopiaryTensor
import TopiaryTestSupport
import XCTest

/// OWL's allocation (Yin et al. 2024): block sparsities from outlier ratios.
final class AllocationTests: XCTestCase {
    func testOWLScalesTheRatiosToTwoLambdaAndKeepsTheMeanAtTheTarget() throws {
        let s = try OWLAllocation.sparsities(ratios: [0.01, 0.03, 0.02, 0.05], pruned: [0, 1, 2, 3], target: 0.7, lambda: 0.08)
        XCTAssertEqual(s.reduce(0, +) / 4, 0.7, accuracy: 1e-12)
        // The most outliers keep the most weights: sparsity target − λ; the fewest: target + λ.
        XCTAssertEqual(s[3], 0.7 - (0.16 - (0 + 0.08 + 0.04 + 0.16) / 4), accuracy: 1e-12)
        XCTAssertEqual(s.max()! - s.min()!, 0.16, accuracy: 1e-12)
        XCTAssertEqual(s.firstIndex(of: s.min()!), 3)
        XCTAssertEqual(s.firstIndex(of: s.max()!), 0)
        // Blocks outside --layers keep the target; equal ratios give the target everywhere.
        let some = try OWLAllocation.sparsities(ratios: [0.5, 0.01, 0.03, 0.9], pruned: [1, 2], target: 0.6, lambda: 0.1)
        XCTAssertEqual(some[0], 0.6)
        XCTAssertEqual(some[3], 0.6)
        XCTAssertEqual(some[1] + some[2], 1.2, accuracy: 1e-12)
        XCTAssertEqual(try OWLAllocation.sparsities(ratios: [0.2, 0.2], pruned: [0, 1], target: 0.5, lambda: 0.1), [0.5, 0.5])
        XCTAssertThrowsError(try OWLAllocation.sparsities(ratios: [0, 1], pruned: [0, 1], target: 0.95, lambda: 0.2)) { e in
            XCTAssertTrue("\(e)".contains("--owl-lambda 0.2"), "\(e)")
        }
    }

    func testOutlierRatiosCountScoresAboveMTimesTheMean() throws {
        let model = try LanguageModel.open(path: TestPaths.fixture("tiny-llama"))
        let job = PruneJob(plan: PrunePlan(method: .wanda, pattern: .unstructured(0.5)), calibration: [Array(0..<16), Array(16..<32)],
                           sequenceLength: 16, layers: nil, memoryBudget: 1 << 26, workDirectory: NSTemporaryDirectory())
        let ratios = try OWLAllocation.outlierRatios(model: model, job: job, m: 5)
        XCTAssertEqual(ratios.count, model.config.layerCount)
        XCTAssertTrue(ratios.allSatisfy { $0 >= 0 && $0 < 0.2 }, "\(ratios)")
        // A lower threshold counts more outliers; M = 0 counts every weight with a non-zero score.
        let lower = try OWLAllocation.outlierRatios(model: model, job: job, m: 1)
        XCTAssertTrue(zip(lower, ratios).allSatisfy { $0 >= $1 })
        XCTAssertGreaterThan(lower.reduce(0, +), ratios.reduce(0, +))
        // The plan of each block carries its sparsity.
        var plan = PrunePlan(method: .wanda, pattern: .unstructured(0.5))
        plan.allocation = [0.4, 0.6]
        XCTAssertEqual(plan.forBlock(1).pattern, .unstructured(0.6))
        XCTAssertNil(plan.forBlock(1).allocation)
        XCTAssertEqual(plan.forBlock(5).pattern, .unstructured(0.5))
    }

    /// Convex curves e_b(s) = a_b·s² on a grid of step 0.05: the hull segments' slopes
    /// a_b(2s + h) put the optimum at the grid points s_b ∝ 1/a_b (the Lagrange condition
    /// 2a_b·s_b = μ), here 0.8, 0.4, 0.2 for a = 1, 2, 4 and a mean of 1.4/3.
    func testLearnedSolverFindsTheKnownOptimumOfConvexCurves() throws {
        let grid = (0...20).map { Double($0) * 0.05 }
        let curves = [1.0, 2, 4].map { a in LearnedAllocation.Curve(sparsities: grid, errors: grid.map { a * $0 * $0 }) }
        let s = try LearnedAllocation.solve(curves: curves, weights: [1, 1, 1], target: 1.4 / 3)
        for (got, want) in zip(s, [0.8, 0.4, 0.2]) { XCTAssertEqual(got, want, accuracy: 1e-12) }
        XCTAssertEqual((s[0] + s[1] + s[2]) / 3, 1.4 / 3, accuracy: 1e-15)
        // Weighted by parameters: a block twice as large moves half as far for the same error per weight.
        let w = [1.0, 3, 2]
        let t = try LearnedAllocation.solve(curves: curves, weights: w, target: 0.55)
        XCTAssertEqual(zip(t, w).reduce(0) { $0 + $1.0 * $1.1 } / 6, 0.55, accuracy: 1e-15)
    }

    /// Against brute force: every combination of grid points whose weighted mean is the target;
    /// the solver (which may also stop between points) never does worse than the best of them, and
    /// where the best combination is unique and convex curves make it optimal, it finds it.
    func testLearnedSolverIsNoWorseThanEveryGridCombination() throws {
        var rng = SplitMix64(seed: 17)
        let grid = [0.5, 0.6, 0.7, 0.8, 0.9]
        for _ in 0..<20 {
            // Convex increasing curves: increments that grow.
            let curves = (0..<3).map { _ -> LearnedAllocation.Curve in
                var e = [rng.nextUnit()], step = 0.01 + rng.nextUnit() * 0.1
                for _ in 1..<grid.count {
                    e.append(e.last! + step)
                    step *= 1 + rng.nextUnit()
                }
                return LearnedAllocation.Curve(sparsities: grid, errors: e)
            }
            let s = try LearnedAllocation.solve(curves: curves, weights: [1, 1, 1], target: 0.7)
            XCTAssertEqual(s.reduce(0, +) / 3, 0.7, accuracy: 1e-15)
            func error(_ b: Int, _ x: Double) -> Double {
                let c = curves[b]
                let k = min(max(0, Int(((x - 0.5) / 0.1).rounded(.down))), grid.count - 2)
                let f = (x - grid[k]) / 0.1
                return c.errors[k] * (1 - f) + c.errors[k + 1] * f
            }
            let solved = (0..<3).reduce(0.0) { $0 + error($1, s[$1]) }
            var best = Double.infinity
            for i in 0..<5 { for j in 0..<5 { for k in 0..<5 where i + j + k == 6 {
                best = min(best, curves[0].errors[i] + curves[1].errors[j] + curves[2].errors[k])
            } } }
            XCTAssertLessThanOrEqual(solved, best + 1e-12)
        }
    }

    /// The blend keeps the weighted mean at the target for every share, is the target at 0 and
    /// the solution at 1, moves each block in proportion, and leaves a block without a curve alone.
    func testLearnedBlendKeepsTheTargetAndInterpolates() throws {
        let c = LearnedAllocation.Curve(sparsities: [0.6, 0.7, 0.8], errors: [0, 1, 2])
        let curves: [LearnedAllocation.Curve?] = [c, nil, c, c]
        let weights = [3.0, 7.0, 1.0, 2.0]
        let solved = [0.6, 0.7, 0.8, 0.85]  // weighted over the curved blocks: (1.8 + 0.8 + 1.7) / 6 ≈ 0.7167
        let target = (3 * 0.6 + 0.8 + 2 * 0.85) / 6
        XCTAssertEqual(LearnedAllocation.blend(solved, curves: curves, weights: weights, target: target, share: 1), solved)
        for share in LearnedAllocation.blendGrid {
            let b = LearnedAllocation.blend(solved, curves: curves, weights: weights, target: target, share: share)
            XCTAssertEqual(b[1], 0.7, "a block without a curve keeps its value")
            let mean = (3 * b[0] + b[2] + 2 * b[3]) / 6
            XCTAssertEqual(mean, target, accuracy: 1e-15, "share \(share)")
            for k in [0, 2, 3] { XCTAssertEqual(b[k], target + share * (solved[k] - target), accuracy: 1e-12, "share \(share) block \(k)") }
        }
        XCTAssertEqual(LearnedAllocation.blendGrid, [0, 0.25, 0.5, 0.75, 1])
    }

    /// The searches' choice: the least finite loss, the first on a tie; skipped candidates and
    /// non-finite losses are recorded as none and never chosen; none finite gives no choice.
    func testSearchChoosesTheLeastFiniteLoss() {
        let scores: [Double?] = [3, nil, .nan, 1.5, .infinity, 1.5, 2]
        let found = AllocationSearch.least(Array(scores.indices)) { scores[$0] }
        XCTAssertEqual(found.best, 3)
        XCTAssertEqual(found.losses.count, scores.count)
        XCTAssertEqual(found.losses.map { $0.map { "\($0)" } ?? "none" }, ["3.0", "none", "none", "1.5", "none", "1.5", "2.0"])
        let none = AllocationSearch.least([0.1, 0.2] as [Double]) { (c: Double) -> Double? in c < 0.15 ? .nan : -.infinity }
        XCTAssertNil(none.best)
        XCTAssertEqual(none.losses.compactMap { $0 }.count, 0)
    }

    /// A magnitude run's candidates are scored with magnitude's masks, which do not depend on the
    /// input norms; every other method's with Wanda's, which do.
    func testSearchScoresMagnitudeWithItsOwnMasks() throws {
        let model = try LanguageModel.open(path: TestPaths.asset("stories260K/stories260K.bin"),
                                           tokenizerPath: TestPaths.asset("stories260K/tok512.bin"))
        let text = try String(contentsOfFile: TestPaths.asset("public-domain-text/wizard_of_oz.txt"), encoding: .utf8)
        let windows = try Calibration.windows(tokens: model.tokenizer!.encode(text, addBOS: nil), samples: 4, sequenceLength: 64, seed: 0)
        let dir = try makeTemporaryDirectory("allocation-search").path
        func job(_ method: PruneMethod) -> PruneJob {
            PruneJob(plan: PrunePlan(method: method, pattern: .unstructured(0.5)), calibration: windows, sequenceLength: 64,
                     layers: nil, memoryBudget: 1 << 30, workDirectory: dir)
        }
        let blocks = model.config.layerCount
        let sparsities = (0..<blocks).map { 0.4 + 0.3 * Double($0) / Double(max(blocks - 1, 1)) }
        let norms = try OWLAllocation.denseScores(model: model, job: job(.wanda), m: 5).squaredNorms
        let flat = norms.map { $0.mapValues { [Float](repeating: 1, count: $0.count) } }
        func loss(_ method: PruneMethod, _ n: [[String: [Float]]]) throws -> Double {
            try AllocationSearch.loss(model: model, job: job(method), sparsities: sparsities, squaredNorms: n)
        }
        let magnitude = try loss(.magnitude, norms)
        XCTAssertEqual(magnitude, try loss(.magnitude, flat), "magnitude's masks ignore the norms")
        // Wanda's masks (per row) depend on the norms and are not magnitude's (one threshold a linear).
        let wanda = try loss(.sparsegpt, norms)
        XCTAssertNotEqual(wanda, try loss(.sparsegpt, flat))
        XCTAssertNotEqual(wanda, magnitude)
        XCTAssertTrue(magnitude.isFinite)
        XCTAssertEqual(AllocationSearch.masks(job(.magnitude).plan), "magnitude masks")
    }

    func testLearnedSolverSkipsPointsAboveTheHullAndRefusesAnUnreachableTarget() throws {
        XCTAssertEqual(LearnedAllocation.grid(target: 0.7).count, 9)
        XCTAssertEqual(LearnedAllocation.grid(target: 0.7).first!, 0.6, accuracy: 1e-12)
        // Inside [0.01, 0.99]: the points past either end are left out.
        XCTAssertEqual(LearnedAllocation.grid(target: 0.95).last!, 0.975, accuracy: 1e-12)
        XCTAssertEqual(LearnedAllocation.grid(target: 0.95).count, 6)
        XCTAssertEqual(LearnedAllocation.grid(target: 0.02).first!, 0.02)
        XCTAssertEqual(LearnedAllocation.grid(target: 0.02).count, 5)
        // Block 0's error jumps at 0.6 then falls back: the hull goes straight from 0.5 to 0.7.
        let bumpy = LearnedAllocation.Curve(sparsities: [0.5, 0.6, 0.7], errors: [0, 10, 1])
        let flat = LearnedAllocation.Curve(sparsities: [0.5, 0.6, 0.7], errors: [0, 0.6, 1.2])
        XCTAssertEqual(LearnedAllocation.lowerHull(bumpy).map(\.s), [0.5, 0.7])
        let s = try LearnedAllocation.solve(curves: [bumpy, flat], weights: [1, 1], target: 0.6)
        // Block 0's hull costs 5 per unit of sparsity, block 1's 6: block 0 takes the budget.
        XCTAssertEqual(s[0], 0.7, accuracy: 1e-12)
        XCTAssertEqual(s[1], 0.5, accuracy: 1e-12)
        // A block outside --layers (nil) keeps the target and does not count.
        let some = try LearnedAllocation.solve(curves: [nil, flat, flat], weights: [5, 1, 1], target: 0.6)
        XCTAssertEqual(some[0], 0.6)
        XCTAssertEqual(some[1] + some[2], 1.2, accuracy: 1e-15)
        XCTAssertThrowsError(try LearnedAllocation.solve(curves: [flat], weights: [1], target: 0.8)) { e in
            XCTAssertTrue("\(e)".contains("--allocation learned"), "\(e)")
        }
    }
}
