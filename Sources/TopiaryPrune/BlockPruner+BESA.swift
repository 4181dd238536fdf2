import Foundation
import TopiaryModel
import TopiaryTensor

extension BlockPruner {
    /// BESA for one block: each calibration sequence's input is the pruned-so-far stream; the
    /// output to reconstruct is the dense block's output on it (`--targets sequential`), or the
    /// dense model's own output of this block (`--targets dense`, from `targets`).
    func pruneBESA(_ block: DeviceBlock, inputs: ActivationStore, denseOutputs: ActivationStore, targets: ActivationStore?,
                   stats: [String: LayerStatistics], sequenceLength: Int) throws -> (weights: [String: Tensor], summary: BESA.Summary) {
        guard case .unstructured(let sparsity) = plan.pattern else {
            throw PruneError.invalidOption("BESA learns unstructured sparsity; give --sparsity, not --pattern \(plan.pattern)")
        }
        var reconstructionTargets = denseOutputs
        if plan.targets == .dense {
            guard let targets else { throw PruneError.shape("block \(block.index): BESA with dense targets needs the dense activations") }
            let rope = block.config.ropeTable(positions: sequenceLength)
            reconstructionTargets = inputs.makeSibling()
            for s in 0..<targets.count {
                try reconstructionTargets.set(s, block.forward(try targets.tensor(s), sequenceLength: sequenceLength, rope: rope))
            }
        }
        let keys = Self.statisticsKeys(block.inputGroups)
        func statistics(_ name: String) throws -> LayerStatistics {
            guard let st = stats[keys[name] ?? name] else {
                throw PruneError.shape("block \(block.index): no statistics collected for \(name)")
            }
            return st
        }
        let r = try BESA.prune(block: block, samples: inputs.count, sequenceLength: sequenceLength,
                               sample: { s in (try inputs.tensor(s), try reconstructionTargets.tensor(s)) },
                               inputSquaredNorms: { try statistics($0).squaredNormsTensor }, hessian: { try statistics($0).hessianTensor },
                               target: sparsity, options: plan.besa ?? BESA.Options(), sparseGPT: plan.sparseGPT)
        return (r.weights, r.summary)
    }
}
