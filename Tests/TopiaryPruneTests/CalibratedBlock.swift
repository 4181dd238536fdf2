import Foundation
import XCTest
import TopiaryModel
import TopiaryTensor
import TopiaryTestSupport
@testable import TopiaryPrune

extension XCTestCase {
    /// Block `index` of `model` and its inputs (the dense model's activations) on `samples` windows.
    func calibratedBlock(_ model: LanguageModel, tokens: [Int], block index: Int, samples: Int, seqlen: Int) throws -> (DecoderBlock, ActivationStore) {
        let windows = try Calibration.windows(tokens: tokens, samples: samples, sequenceLength: seqlen, seed: 0)
        let dir = try makeTemporaryDirectory("calibrated-block").path
        let store = ActivationStore(count: samples, rows: seqlen, cols: model.config.hiddenSize, budgetBytes: 1 << 30, spillDirectory: dir)
        let embedding = try model.loadEmbedding()
        for (i, w) in windows.enumerated() {
            var x = embedding.embed(w, sequenceLength: seqlen)
            for b in 0..<index { x = try model.loadBlock(b).forward(x, sequenceLength: seqlen) }
            try store.set(i, x)
        }
        return (try model.loadBlock(index), store)
    }
}
