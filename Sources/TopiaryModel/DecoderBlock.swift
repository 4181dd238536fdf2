import Foundation
import TopiaryTensor

/// Called with each linear layer's name (checkpoint name without ".weight") and its input
/// [tokens x in_features], on the block's backend, just before the layer is applied; pruning
/// collects statistics here.
public typealias LinearObserver = (_ linear: String, _ input: Tensor) -> Void

/// A gated feed-forward's products for one input x, on the block's backend: gate(x), up(x),
/// act(gate(x)) ⊙ up(x) (what down reads) and down's output. They are the pass's own tensors:
/// valid during the observer's call only (the block then adds its residual into the output).
/// An observer copies what it keeps.
public struct FeedForwardProducts: Sendable {
    public let gate: Tensor
    public let up: Tensor
    public let activation: Tensor
    public let output: Tensor
}

/// Called with a gated feed-forward's gate linear (name without ".weight") and its products,
/// right after its down projection; SparseLLM's solve starts from them instead of making them again.
public typealias FeedForwardObserver = (_ gate: String, _ products: FeedForwardProducts) -> Void

/// One decoder block of any family, with its weights under their checkpoint names. What the
/// block is made of and how it runs is its family's knowledge (Families/).
public struct DecoderBlock: Sendable {
    public let config: ModelConfig
    public let index: Int
    /// All tensors of the block by full checkpoint name ("model.layers.3.mlp.up_proj.weight").
    public var tensors: [String: Matrix]

    public init(config: ModelConfig, index: Int, tensors: [String: Matrix]) {
        self.config = config
        self.index = index
        self.tensors = tensors
    }

    /// Every tensor of the block as its family defines it.
    public var specs: [BlockTensorSpec] { config.family.blockTensors(config, block: index) }

    /// Loads block `index` from `source`, checking every tensor's shape.
    public static func load(from source: any TensorSource, config: ModelConfig, index: Int) throws -> DecoderBlock {
        var tensors: [String: Matrix] = [:]
        for spec in config.family.blockTensors(config, block: index) {
            var m = try source.load(spec.name)
            if m.rows == 1 && spec.rows != 1 && m.cols == spec.rows * spec.cols {
                m = m.reshaped(rows: spec.rows, cols: spec.cols)
            }
            guard m.rows == spec.rows && m.cols == spec.cols else {
                throw CheckpointError.shapeMismatch(path: source.path, tensor: spec.name,
                                                   expected: "[\(spec.rows), \(spec.cols)]", found: "[\(m.rows), \(m.cols)]")
            }
            tensors[spec.name] = m
        }
        return DecoderBlock(config: config, index: index, tensors: tensors)
    }

    /// The linear layers in forward order (names without ".weight").
    public var linearNames: [String] { config.family.linears(config, block: index) }
    /// Groups of linears that read the same input.
    public var inputGroups: [[String]] { config.family.inputGroups(config, block: index) }
    /// The feed-forward networks (SparseLLM's auxiliary-variable problems).
    public var feedForwards: [FeedForward] { config.family.feedForwards(config, block: index) }

    public func weight(_ linear: String) -> Matrix { tensor(linear + ".weight") }
    public func bias(_ linear: String) -> Matrix? { tensors[linear + ".bias"] }

    func tensor(_ name: String) -> Matrix {
        guard let m = tensors[name] else { preconditionFailure("block \(index) has no tensor \(name)") }
        return m
    }

    public var parameterCount: Int { tensors.values.reduce(0) { $0 + $1.count } }

    /// The block's tensors on `backend` (an upload of each), ready to run.
    public func on(_ backend: any ComputeBackend) -> DeviceBlock { DeviceBlock(self, backend: backend) }

    /// Runs the block over `x` [sequences*sequenceLength x hidden] on `backend`, each sequence at
    /// positions 0..<sequenceLength: the host's way in (an upload of the block and of `x`, a
    /// download of the output). Drivers that run a block more than once use `on(_:)`.
    public func forward(_ x: Matrix, sequenceLength: Int, rope: Kernels.RopeTable? = nil, expertCalibration: ExpertCalibration = .routed,
                        backend: any ComputeBackend = ComputeDevices.defaultBackend) -> Matrix {
        let device = on(backend)
        return backend.download(device.forward(backend.upload(x), sequenceLength: sequenceLength, rope: rope, expertCalibration: expertCalibration))
    }

    /// The same forward pass as `forward` (the same code, so the same output), keeping what
    /// `weightGradients` needs.
    public func forwardRecording(_ x: Matrix, sequenceLength: Int, rope: Kernels.RopeTable? = nil,
                                 backend: any ComputeBackend = ComputeDevices.defaultBackend) -> (output: Matrix, tape: BlockTape) {
        let (y, tape) = on(backend).forwardRecording(backend.upload(x), sequenceLength: sequenceLength, rope: rope)
        return (backend.download(y), tape)
    }

    /// ∂L/∂W for every linear layer (by name, without ".weight") on the host, given ∂L/∂output
    /// and the tape of the forward pass that produced the output (on the tape's backend).
    public func weightGradients(outputGradient dy: Matrix, tape: BlockTape) -> [String: Matrix] {
        let backend = tape.backend
        return on(backend).weightGradients(outputGradient: backend.upload(dy), tape: tape).mapValues { backend.download($0) }
    }
}

/// A decoder block's tensors on a compute backend, and the block's forward and backward passes
/// there: every operation goes through the backend, so a block's activations never cross to
/// the host between its input and its output.
public struct DeviceBlock: Sendable {
    public let config: ModelConfig
    public let index: Int
    public let backend: any ComputeBackend
    /// Every tensor of the block by full checkpoint name.
    let tensors: [String: Tensor]
    /// RMSNorm weights as the family applies them (Gemma-2 scales by 1 + w), by name.
    let normWeights: [String: Tensor]
    /// Linears whose products this block does not make (`withoutProducts`): each still shows
    /// its input to the pass's observer, and gives zeros.
    let skipped: Set<String>

    init(_ block: DecoderBlock, backend: any ComputeBackend) {
        config = block.config
        index = block.index
        self.backend = backend
        tensors = block.tensors.mapValues { backend.upload($0) }
        let offset = block.config.family.rmsNormOffset
        var norms: [String: Tensor] = [:]
        if offset != 0 {
            for (name, m) in block.tensors where name.hasSuffix("norm.weight") {
                var shifted = m
                shifted.withUnsafeMutableBufferPointer { p in for i in p.indices { p[i] += offset } }
                norms[name] = backend.upload(shifted)
            }
        }
        normWeights = norms
        skipped = []
    }

    private init(config: ModelConfig, index: Int, backend: any ComputeBackend, tensors: [String: Tensor], normWeights: [String: Tensor],
                 skipped: Set<String>) {
        self.config = config
        self.index = index
        self.backend = backend
        self.tensors = tensors
        self.normWeights = normWeights
        self.skipped = skipped
    }

    /// The same block for a pass that only collects the linears' inputs: the linears named (by
    /// name, without ".weight") show their inputs to the observer but make no product, and give
    /// zeros in its place, so the block's output is not its output. For the feed-forward's last
    /// linears (down_proj, fc2, each expert's), whose products feed nothing but the output: a
    /// statistics pass whose output no one reads saves their FLOPs (a quarter of a LLaMA
    /// block's linear work).
    public func withoutProducts(of names: Set<String>) -> DeviceBlock {
        for name in names where tensors[name + ".weight"] == nil { preconditionFailure("block \(index) has no tensor \(name).weight") }
        return DeviceBlock(config: config, index: index, backend: backend, tensors: tensors, normWeights: normWeights, skipped: skipped.union(names))
    }

    /// The same block with some linears' weights replaced (by name, without ".weight"), without a transfer.
    public func replacing(weights: [String: Tensor]) -> DeviceBlock {
        var t = tensors
        for (name, w) in weights {
            let key = name + ".weight"
            guard let old = t[key] else { preconditionFailure("block \(index) has no tensor \(key)") }
            precondition(old.rows == w.rows && old.cols == w.cols, "block \(index): \(key) is \(old), its replacement \(w)")
            t[key] = w
        }
        return DeviceBlock(config: config, index: index, backend: backend, tensors: t, normWeights: normWeights, skipped: skipped)
    }

    /// The linear layers in forward order (names without ".weight").
    public var linearNames: [String] { config.family.linears(config, block: index) }
    /// Groups of linears that read the same input.
    public var inputGroups: [[String]] { config.family.inputGroups(config, block: index) }

    public func weight(_ linear: String) -> Tensor { tensor(linear + ".weight") }
    public func bias(_ linear: String) -> Tensor? { tensors[linear + ".bias"] }

    func tensor(_ name: String) -> Tensor {
        guard let t = tensors[name] else { preconditionFailure("block \(index) has no tensor \(name)") }
        return t
    }

    /// Runs the block over `x` [sequences*sequenceLength x hidden], each sequence at positions
    /// 0..<sequenceLength, and returns the block's output of the same shape.
    /// `feedForwards`, when given, sees every gated feed-forward's products (which the pass then
    /// keeps apart instead of overwriting the gate's product with the activation).
    public func forward(_ x: Tensor, sequenceLength: Int, rope: Kernels.RopeTable? = nil, expertCalibration: ExpertCalibration = .routed,
                        observer: LinearObserver? = nil, feedForwards: FeedForwardObserver? = nil) -> Tensor {
        var pass = makePass(x, sequenceLength: sequenceLength, rope: rope, observer: observer, recording: false)
        pass.expertCalibration = expertCalibration
        pass.feedForwardObserver = feedForwards
        return config.family.forward(self, x, &pass)
    }

    /// The same forward pass as `forward`, keeping what `weightGradients` needs.
    public func forwardRecording(_ x: Tensor, sequenceLength: Int, rope: Kernels.RopeTable? = nil) -> (output: Tensor, tape: BlockTape) {
        var pass = makePass(x, sequenceLength: sequenceLength, rope: rope, observer: nil, recording: true)
        let y = config.family.forward(self, x, &pass)
        return (y, pass.tape)
    }

    /// ∂L/∂W for every linear layer (by name, without ".weight"), given ∂L/∂output and the tape
    /// of the forward pass that produced the output. W is the weight the forward used, so for a
    /// masked block this is the gradient with respect to the effective weight W⊙M.
    public func weightGradients(outputGradient dy: Tensor, tape: BlockTape) -> [String: Tensor] {
        precondition(dy.cols == config.hiddenSize && dy.rows % tape.sequenceLength == 0, "block \(index): output gradient is \(dy.rows)x\(dy.cols)")
        return config.family.weightGradients(self, dy, tape)
    }

    func makePass(_ x: Tensor, sequenceLength: Int, rope: Kernels.RopeTable?, observer: LinearObserver?, recording: Bool) -> BlockPass {
        precondition(x.cols == config.hiddenSize, "block \(index): input has \(x.cols) features, expected \(config.hiddenSize)")
        precondition(sequenceLength > 0 && x.rows % sequenceLength == 0, "block \(index): \(x.rows) rows is not a whole number of sequences of \(sequenceLength)")
        let table = config.architecture.isLlamaLike ? (rope ?? config.ropeTable(positions: sequenceLength)) : nil
        return BlockPass(sequenceLength: sequenceLength, rope: table, observer: observer, recording: recording, backend: backend)
    }

    /// y = x Wᵀ (+ b), reporting the input to the observer first.
    func apply(_ linear: String, _ x: Tensor, _ observer: LinearObserver?) -> Tensor {
        observer?(linear, x)
        if skipped.contains(linear) { return backend.zeros(rows: x.rows, cols: weight(linear).rows) }
        return backend.linear(x, weight(linear), bias: bias(linear))
    }

    /// The linears of one input group (q/k/v, gate/up) on the same x, each its own product.
    /// (They were one GEMM over the stacked weights, its columns then copied out: a second copy
    /// of the group's weights in memory, and at 2048 tokens 0.59-0.71 of the sgemm rate for the
    /// whole block against 0.72-0.75 apart; at 512 tokens the stacked product was about 3%
    /// faster. The same bits either way at the model's shapes.) The observer sees x once per
    /// linear, as `apply` reports it.
    func apply(_ linears: [String], _ x: Tensor, _ observer: LinearObserver?) -> [Tensor] {
        linears.map { apply($0, x, observer) }
    }

    /// x + y, written into y: for the residual connections, where y is a layer's fresh output
    /// that nothing else holds (the same bits as a new tensor x + y, without one).
    func residual(_ x: Tensor, plus y: Tensor) -> Tensor {
        backend.add(x, into: y)
        return y
    }

    func applyRope(_ m: Tensor, heads: Int, sequenceLength: Int, rope: Kernels.RopeTable, inverse: Bool = false) {
        backend.rope(m, heads: heads, headDim: config.headDim, sequenceLength: sequenceLength, table: rope, layout: config.ropeLayout, inverse: inverse)
    }

    /// An RMSNorm weight as the family applies it (Gemma-2 scales by 1 + w).
    func normWeight(_ name: String) -> Tensor { normWeights[name] ?? tensor(name) }

    func rmsNorm(_ x: Tensor, _ weight: String) -> Tensor {
        backend.rmsNorm(x, weight: normWeight(weight), eps: config.normEps)
    }

    func layerNorm(_ x: Tensor, _ weight: String, _ bias: String) -> Tensor {
        backend.layerNorm(x, weight: tensor(weight), bias: tensor(bias), eps: config.normEps)
    }

    func rmsNormBackward(_ input: Tensor, _ weight: String, _ dy: Tensor) -> Tensor {
        backend.rmsNormBackward(input: input, weight: normWeight(weight), eps: config.normEps, outputGradient: dy)
    }

    func layerNormBackward(_ input: Tensor, _ weight: String, _ dy: Tensor) -> Tensor {
        backend.layerNormBackward(input: input, weight: tensor(weight), eps: config.normEps, outputGradient: dy)
    }

    /// x + y as a new tensor.
    func sum(_ x: Tensor, _ y: Tensor) -> Tensor {
        let out = backend.copy(x)
        backend.add(y, into: out)
        return out
    }
}

extension ModelFamily {
    /// RMSNorm scales by (offset + w): 0 for most families, 1 for Gemma-2.
    public static var rmsNormOffset: Float { 0 }
}

extension ModelConfig {
    /// Rotary tables for positions 0..<positions, with the config's frequency scaling.
    public func ropeTable(positions: Int) -> Kernels.RopeTable {
        var theta = ropeTheta
        if case .dynamic(let factor)? = ropeScaling, positions > maxPositions {
            // transformers' dynamic NTK: the base grows with the sequence beyond the trained context.
            let d = Float(headDim)
            theta *= powf(factor * Float(positions) / Float(maxPositions) - (factor - 1), d / (d - 2))
        }
        let scaling = ropeScaling
        // Rounding the frequencies to the checkpoint's dtype reproduces a transformers model cast
        // with .to(dtype) (the tiny-llama-bf16 fixture); current transformers keeps scaled
        // frequencies in fp32 (the tiny-llama3 fixture), so scaled RoPE is never rounded.
        let rounding = scaling == nil ? ropeFrequencyRounding : .none
        return Kernels.RopeTable(rotaryDim: headDim, theta: theta, positions: positions, frequencyRounding: rounding) { freq in
            switch scaling {
            case .linear(let factor)?: return freq / factor
            case .llama3(let factor, let low, let high, let original)?:
                let lowWavelength = Float(original) / low
                let highWavelength = Float(original) / high
                let wavelength = 2 * Float.pi / freq
                if wavelength < highWavelength { return freq }
                if wavelength > lowWavelength { return freq / factor }
                let smooth = (Float(original) / wavelength - low) / (high - low)
                return (1 - smooth) * freq / factor + smooth * freq
            case .dynamic?, nil: return freq
            }
        }
    }
}
