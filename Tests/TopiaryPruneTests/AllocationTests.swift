import Foundation
@testable import TopiaryPrune
import TopiaryModel
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
}
