/// Everything that can be wrong with a checkpoint or a file the tool reads, with the file and
/// the offending tensor or field named, and what was expected against what was found.
public enum CheckpointError: Error, CustomStringConvertible, Equatable {
    case io(path: String, detail: String)
    case badMagic(path: String, expected: String, found: String)
    case truncated(path: String, detail: String)
    case tensorOutOfBounds(path: String, tensor: String, end: Int, fileSize: Int)
    case unsupportedType(path: String, tensor: String, type: String)
    case missingTensor(path: String, tensor: String)
    case shapeMismatch(path: String, tensor: String, expected: String, found: String)
    case invalidHeader(path: String, detail: String)
    case missingField(path: String, field: String)
    case invalidField(path: String, field: String, detail: String)
    case unsupportedModel(path: String, detail: String)

    public var description: String {
        switch self {
        case .io(let p, let d): return "\(p): \(d)"
        case .badMagic(let p, let e, let f): return "\(p): not a recognised file: expected magic \(e), found \(f)"
        case .truncated(let p, let d): return "\(p): file is truncated: \(d)"
        case .tensorOutOfBounds(let p, let t, let end, let size):
            return "\(p): tensor '\(t)' extends to byte \(end), past the end of the file (\(size) bytes)"
        case .unsupportedType(let p, let t, let ty): return "\(p): tensor '\(t)' has unsupported type \(ty)"
        case .missingTensor(let p, let t): return "\(p): tensor '\(t)' is missing"
        case .shapeMismatch(let p, let t, let e, let f): return "\(p): tensor '\(t)' has shape \(f), expected \(e)"
        case .invalidHeader(let p, let d): return "\(p): invalid header: \(d)"
        case .missingField(let p, let f): return "\(p): required field '\(f)' is missing"
        case .invalidField(let p, let f, let d): return "\(p): field '\(f)' \(d)"
        case .unsupportedModel(let p, let d): return "\(p): unsupported model: \(d)"
        }
    }
}
