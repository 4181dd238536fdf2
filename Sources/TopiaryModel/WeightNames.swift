/// Checkpoint (Hugging Face) names of a model's tensors. Every reader exposes its tensors under
/// these names, so blocks, pruners and writers use one vocabulary; the family decides them.
public enum WeightNames {
    public static func blockPrefix(_ arch: Architecture, _ i: Int) -> String { arch.family.blockPrefix(i) }

    /// The linear layers of block `i`, in forward order, without the ".weight" suffix.
    public static func linears(_ config: ModelConfig, block i: Int) -> [String] { config.family.linears(config, block: i) }

    /// Every tensor of block `i`.
    public static func blockTensors(_ config: ModelConfig, block i: Int) -> [String] {
        config.family.blockTensors(config, block: i).map(\.name)
    }

    public static func tokenEmbedding(_ arch: Architecture) -> String { arch.family.tokenEmbedding }

    public static let positionEmbedding = "model.decoder.embed_positions.weight"
    public static let projectIn = "model.decoder.project_in.weight"
    public static let projectOut = "model.decoder.project_out.weight"
    public static let lmHead = "lm_head.weight"

    /// Final norm tensors (weight, and bias for OPT).
    public static func finalNorm(_ arch: Architecture) -> [String] { arch.family.finalNorm }
}
