import Foundation
import XCTest
@testable import TopiaryPrune
import TopiaryModel

final class ProfileTests: XCTestCase {
    func testReportsWithoutAProfileStillDecode() throws {
        // A worker that predates profiles sends no "profile" field.
        let old = #"{"block":3,"linears":[],"outputError":0.5,"seconds":1.25}"#
        let r = try JSONDecoder().decode(BlockReport.self, from: Data(old.utf8))
        XCTAssertEqual(r.block, 3)
        XCTAssertNil(r.profile)
    }

    func testProfileRoundTripsAndKeepsUnknownPhases() throws {
        var p = BlockProfile()
        p.add(.solve, seconds: 0.5, flops: 1e9)
        p.add(.solve, seconds: 0.25, flops: 2e9)
        p.phases["future_phase"] = BlockProfile.Cost(seconds: 1, flops: 2)
        var r = BlockReport(block: 0, linears: [], outputError: 0, seconds: 1)
        r.profile = p
        let decoded = try JSONDecoder().decode(BlockReport.self, from: JSONEncoder().encode(r))
        XCTAssertEqual(decoded.profile, p)
        XCTAssertEqual(decoded.profile?[.solve], BlockProfile.Cost(seconds: 0.75, flops: 3e9))
        XCTAssertEqual(decoded.profile?[.load], BlockProfile.Cost())
        // Garbage in the profile is a decoding error, not a crash.
        let garbage = #"{"block":0,"linears":[],"outputError":0,"seconds":1,"profile":{"phases":{"solve":{"seconds":"x","flops":1}}}}"#
        XCTAssertThrowsError(try JSONDecoder().decode(BlockReport.self, from: Data(garbage.utf8)))
    }

    func testCountedFLOPs() {
        // SparseGPT on a 4x8 weight: 2/3·8³ (the factor) + 4·8²; a layer that reuses another's factor, 4·8².
        XCTAssertEqual(BlockProfile.sparseGPTFLOPs(rows: 4, cols: 8), 2.0 / 3.0 * 512 + 256, accuracy: 1e-9)
        XCTAssertEqual(BlockProfile.sparseGPTFLOPs(rows: 4, cols: 8, factored: false), 256, accuracy: 1e-9)
        // BESA on SmolLM2's block shapes, 1 window of 512 tokens, 2 epochs: 3x the linears (forward,
        // weight and input gradients) less q/k/v's input gradient, and 3.5x attention.
        let c = ModelConfig(architecture: .llama, hiddenSize: 576, intermediateSize: 1536, layerCount: 30, headCount: 9, kvHeadCount: 3,
                            vocabularySize: 49152, maxPositions: 2048, normEps: 1e-5, tieWordEmbeddings: true)
        let qkv = 576 * (576 + 2 * 192)
        let linearMACs = qkv + 576 * 576 + 3 * 576 * 1536
        let attention = 2.0 * 2 * (512.0 * 513 / 2) * 576
        let expected = 2 * (3 * 2 * Double(linearMACs) * 512 - 2 * Double(qkv) * 512 + 3.5 * attention)
        XCTAssertEqual(BlockProfile.besaFLOPs(c, sequences: 1, sequenceLength: 512, epochs: 2, firstGroupMACsPerToken: qkv), expected,
                       accuracy: 1e-6 * expected)
    }
}
