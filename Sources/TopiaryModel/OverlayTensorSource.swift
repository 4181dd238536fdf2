import Foundation
import TopiaryTensor

/// A model's tensors with some replaced by tensors from other sources: a pruned model is the
/// original checkpoint overlaid with the blocks written as they were pruned.
public final class OverlayTensorSource: TensorSource, @unchecked Sendable {
    public let base: any TensorSource
    private let overrides: [String: any TensorSource]
    public var path: String { base.path }
    public var tensorNames: [String] { base.tensorNames }

    /// `layers` are sources whose every tensor replaces the base tensor of the same name.
    public init(base: any TensorSource, layers: [any TensorSource]) {
        self.base = base
        var map: [String: any TensorSource] = [:]
        for layer in layers { for name in layer.tensorNames { map[name] = layer } }
        overrides = map
    }

    public func entry(_ name: String) -> TensorEntry? { (overrides[name] ?? base).entry(name) }
    public func load(_ name: String) throws -> Matrix { try (overrides[name] ?? base).load(name) }
    public func load(_ name: String, rows: Range<Int>) throws -> Matrix { try (overrides[name] ?? base).load(name, rows: rows) }
    public func prefetch(_ name: String) { (overrides[name] ?? base).prefetch(name) }
}

/// Decoder blocks kept as one safetensors file each in a directory (fp32, checkpoint names).
public struct BlockFileStore: Sendable {
    public let directory: String

    public init(directory: String) throws {
        self.directory = directory
        do { try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true) } catch {
            throw CheckpointError.io(path: directory, detail: "cannot create directory: \(error.localizedDescription)")
        }
    }

    public func path(_ index: Int) -> String {
        (directory as NSString).appendingPathComponent(String(format: "block-%05d.safetensors", index))
    }

    /// Writes every tensor of `block` (atomically: temporary name, fsync, rename).
    public func write(_ block: DecoderBlock) throws {
        var writer = SafeTensorsWriter(directory: directory, metadata: ["block": "\(block.index)"])
        for name in block.tensors.keys.sorted() {
            let m = block.tensors[name]!
            let shape = m.rows == 1 && (name.hasSuffix(".bias") || name.hasSuffix("norm.weight")) ? [m.cols] : [m.rows, m.cols]
            try writer.add(name: name, matrix: m, shape: shape, dtype: .f32)
        }
        try writer.writeSingleFile(to: path(block.index))
    }

    public func contains(_ index: Int) -> Bool { FileManager.default.fileExists(atPath: path(index)) }

    /// The stored blocks as tensor sources, for overlaying on the model they came from.
    public func sources(_ indices: [Int]) throws -> [any TensorSource] {
        try indices.map { try SafeTensorsFile(path: path($0)) }
    }
}

extension LanguageModel {
    /// The same model with some tensors replaced (for example by pruned blocks).
    public func overlaid(with layers: [any TensorSource]) -> LanguageModel {
        LanguageModel(path: path, format: format, config: config,
                      weights: OverlayTensorSource(base: weights, layers: layers), tokenizer: tokenizer)
    }
}

/// Tensors held in memory under checkpoint names (a worker's blocks received over the wire).
public final class MemoryTensorSource: TensorSource, @unchecked Sendable {
    public let path: String
    private let tensors: [String: Matrix]
    public var tensorNames: [String] { tensors.keys.sorted() }

    public init(path: String, tensors: [String: Matrix]) {
        self.path = path
        self.tensors = tensors
    }

    public func entry(_ name: String) -> TensorEntry? {
        tensors[name].map { TensorEntry(name: name, shape: [$0.rows, $0.cols], dtype: .f32, offset: 0, byteCount: $0.count * 4) }
    }

    public func load(_ name: String) throws -> Matrix {
        guard let m = tensors[name] else {
            throw CheckpointError.missingTensor(path: path, tensor: name)
        }
        return m
    }
}
