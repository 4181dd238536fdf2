import Foundation
import TopiaryTensor

/// Presents a checkpoint whose family stores some linears fused (Phi-3's qkv_proj and
/// gate_up_proj) under the logical names Topiary works with, slicing the fused tensor's rows on
/// load. Tensors stored under their own names pass through.
public final class FusedTensorSource: TensorSource, @unchecked Sendable {
    public let base: any TensorSource
    /// Logical name -> (fused checkpoint name, first row, rows).
    private let parts: [String: (fused: String, row: Int, rows: Int)]
    public let tensorNames: [String]
    public var path: String { base.path }

    /// `base` itself when the family fuses nothing.
    public static func wrap(_ base: any TensorSource, config: ModelConfig) -> any TensorSource {
        let source = FusedTensorSource(base: base, config: config)
        return source.parts.isEmpty ? base : source
    }

    init(base: any TensorSource, config: ModelConfig) {
        self.base = base
        var parts: [String: (String, Int, Int)] = [:]
        var fusedNames = Set<String>()
        for i in 0..<config.layerCount {
            let specs = Dictionary(config.family.blockTensors(config, block: i).map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
            for t in config.family.checkpointTensors(config, block: i) where t.parts.count > 1 {
                fusedNames.insert(t.name)
                var row = 0
                for part in t.parts {
                    let rows = specs[part]?.rows ?? 0
                    parts[part] = (t.name, row, rows)
                    row += rows
                }
            }
        }
        self.parts = parts
        let present = Set(base.tensorNames)
        var names: [String] = []
        for name in base.tensorNames {
            if fusedNames.contains(name) {
                names += parts.filter { $0.value.0 == name }.map(\.key).sorted()
            } else {
                names.append(name)
            }
        }
        tensorNames = names.filter { !present.contains($0) || !fusedNames.contains($0) }
    }

    public func entry(_ name: String) -> TensorEntry? {
        if let e = base.entry(name) { return e }
        guard let p = parts[name], let fused = base.entry(p.fused), fused.shape.count == 2 else { return nil }
        let bytesPerRow = fused.shape[0] > 0 ? fused.byteCount / fused.shape[0] : 0
        return TensorEntry(name: name, shape: [p.rows, fused.shape[1]], dtype: fused.dtype,
                           offset: fused.offset + p.row * bytesPerRow, byteCount: p.rows * bytesPerRow)
    }

    public func prefetch(_ name: String) {
        base.prefetch(parts[name].map(\.fused) ?? name)
    }

    public func load(_ name: String) throws -> Matrix {
        if base.entry(name) != nil { return try base.load(name) }
        guard let p = parts[name] else { return try base.load(name) }
        let fused = try base.load(p.fused)
        guard p.row + p.rows <= fused.rows else {
            throw CheckpointError.shapeMismatch(path: base.path, tensor: p.fused, expected: "at least \(p.row + p.rows) rows (to hold \(name))",
                                                found: "[\(fused.rows), \(fused.cols)]")
        }
        return fused.rows(p.row..<(p.row + p.rows))
    }

    public func load(_ name: String, rows: Range<Int>) throws -> Matrix {
        guard base.entry(name) == nil, let p = parts[name] else { return try base.load(name, rows: rows) }
        try Self.checkRows(rows, of: p.rows, tensor: name, path: path)
        return try base.load(p.fused, rows: (p.row + rows.lowerBound)..<(p.row + rows.upperBound))
    }
}
