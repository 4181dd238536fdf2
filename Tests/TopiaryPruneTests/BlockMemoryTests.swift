import XCTest
import TopiaryModel
@testable import TopiaryPrune

final class BlockMemoryTests: XCTestCase {
    static let smolLM2 = ModelConfig(architecture: .llama, hiddenSize: 576, intermediateSize: 1536, layerCount: 30, headCount: 9,
                                     kvHeadCount: 3, vocabularySize: 49152, maxPositions: 2048, normEps: 1e-5, tieWordEmbeddings: true)

    func testSparseLLMHoldsItsVariablesForEveryToken() {
        let c = Self.smolLM2
        let tokens = 128 * 512
        let plan = PrunePlan(method: .sparsellm, pattern: .unstructured(0.5))
        let m = BlockMemory.lowerBound(c, plan: plan, tokens: tokens, budget: 6 << 30)
        XCTAssertEqual(m.weights, 4 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536))
        XCTAssertEqual(m.activations, 4 * 2 * tokens * 576)                 // inputs and dense outputs, all in memory
        // x and y [tokens x 576], s, z and p [tokens x 1536], a chunk's four temporaries, XᵀX and pᵀp.
        XCTAssertEqual(m.solver, 4 * (tokens * (2 * 576 + 3 * 1536) + 4 * 2048 * 1536 + 576 * 576 + 1536 * 1536))
        // The block's Hessians (q/k/v's, o's, gate/up's and down's inputs) and a copy of down's.
        XCTAssertEqual(m.hessians, 4 * (3 * 576 * 576 + 2 * 1536 * 1536))
        // The bound this CLI refuses with is below the peak measured on this model (2.01 GB at
        // 128 x 512 tokens, session 27), as a lower bound must be.
        XCTAssertLessThan(m.total, 2_010_000_000)
        XCTAssertGreaterThan(m.total, 1_800_000_000)
        // A small budget spills the activations (a third of it each); the solver's part stays.
        let spilled = BlockMemory.lowerBound(c, plan: plan, tokens: tokens, budget: 3 << 20)
        XCTAssertEqual(spilled.activations, 2 << 20)
        XCTAssertEqual(spilled.solver, m.solver)
        // Dense targets are a third stream.
        var dense = plan
        dense.targets = .dense
        XCTAssertEqual(BlockMemory.lowerBound(c, plan: dense, tokens: tokens, budget: 6 << 30).activations, 4 * 3 * tokens * 576)
    }

    func testMethodsWithoutAuxiliariesCountWeightsAndActivations() {
        for method in [PruneMethod.magnitude, .wanda, .sparsegpt, .besa] {
            var plan = PrunePlan(method: method, pattern: .unstructured(0.5))
            let m = BlockMemory.lowerBound(Self.smolLM2, plan: plan, tokens: 4096, budget: 1 << 30)
            XCTAssertEqual(m.solver, 0, "\(method)")
            XCTAssertEqual(m.activations, 4 * 2 * 4096 * 576, "\(method)")
            // Only SparseGPT builds Hessians by default; it also factors down's on a copy.
            XCTAssertEqual(m.hessians, method == .sparsegpt ? 4 * (3 * 576 * 576 + 2 * 1536 * 1536) : 0, "\(method)")
            plan.linearErrors = true
            let measured = BlockMemory.lowerBound(Self.smolLM2, plan: plan, tokens: 4096, budget: 1 << 30)
            XCTAssertEqual(measured.hessians, 4 * (3 * 576 * 576 + (method == .sparsegpt ? 2 : 1) * 1536 * 1536), "\(method)")
        }
    }

    func testExpertsHoldEveryExpertsInputs() {
        var c = ModelConfig(architecture: .mixtral, hiddenSize: 64, intermediateSize: 224, layerCount: 2, headCount: 4, kvHeadCount: 2,
                            vocabularySize: 100, maxPositions: 64, normEps: 1e-5, tieWordEmbeddings: false)
        c.expertCount = 8
        c.expertsPerToken = 2
        let tokens = 10_000
        var plan = PrunePlan(method: .sparsellm, pattern: .unstructured(0.5))
        let routed = BlockMemory.lowerBound(c, plan: plan, tokens: tokens, budget: 1 << 30)
        // Routed: 2 x 10000 inputs held; the busiest expert has at least 2500 tokens.
        XCTAssertEqual(routed.solver, 4 * (20_000 * 64 + 2500 * (3 * 224 + 64) + 4 * 2048 * 224 + 64 * 64 + 224 * 224))
        XCTAssertEqual(routed.weights, 4 * (2 * 64 * 64 + 2 * 64 * 32 + 8 * 3 * 64 * 224))
        XCTAssertEqual(routed.hessians, 4 * (2 * 64 * 64 + 8 * (64 * 64 + 224 * 224) + 224 * 224))
        plan.expertCalibration = .all
        let all = BlockMemory.lowerBound(c, plan: plan, tokens: tokens, budget: 1 << 30)
        XCTAssertEqual(all.solver, 4 * (80_000 * 64 + 10_000 * (3 * 224 + 64) + 4 * 2048 * 224 + 64 * 64 + 224 * 224))
    }

    /// Shapes no model has (a hostile assignment's, say) give a huge bound, never an overflow trap.
    func testAbsurdShapesSaturate() {
        var c = ModelConfig(architecture: .mixtral, hiddenSize: Int.max / 2, intermediateSize: Int.max / 3, layerCount: 1,
                            headCount: Int.max / 4, kvHeadCount: Int.max / 4, headDim: Int.max / 5, vocabularySize: 1, maxPositions: 1,
                            normEps: 1e-5, tieWordEmbeddings: false)
        c.expertCount = Int.max / 6
        c.expertsPerToken = Int.max / 7
        var plan = PrunePlan(method: .sparsellm, pattern: .unstructured(0.5), targets: .dense)
        plan.expertCalibration = .all
        let m = BlockMemory.lowerBound(c, plan: plan, tokens: Int.max, budget: Int.max)
        XCTAssertEqual(m.weights, 1 << 60)
        XCTAssertEqual(m.hessians, 1 << 60)
        XCTAssertEqual(m.solver, 1 << 60)
        XCTAssertGreaterThan(m.total, 1 << 61)
        XCTAssertEqual(BlockMemory.lowerBound(c, plan: plan, tokens: -5, budget: -1).activations, 0)
    }
}
