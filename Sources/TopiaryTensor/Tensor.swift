/// Element types a backend's tensors can hold. Float32 is the one every backend has; Float64 is
/// `Float64Backend`'s (the `--precision f64` yardstick); the 16-bit types arrive with the first
/// backend that computes in them.
public enum DType: String, Sendable, Codable {
    case float32
    case float64

    public var byteSize: Int {
        switch self {
        case .float32: return 4
        case .float64: return 8
        }
    }
}

/// A backend's own handle on a tensor's memory (a host buffer, a device pointer). Only the
/// backend that made it looks inside.
public protocol TensorStorage: AnyObject, Sendable {}

/// A rows x cols tensor that lives on a compute backend.
///
/// A `Tensor` is a handle: copies of it share the backend's memory, and a backend operation
/// that writes a tensor is seen through every copy. Data crosses to and from the host only
/// through `ComputeBackend.upload` and `download`, which a `CheckingBackend` counts. `Matrix`
/// stays the host type for files and the wire.
public struct Tensor: Sendable, CustomStringConvertible {
    public let rows: Int
    public let cols: Int
    public let dtype: DType
    public let storage: any TensorStorage

    public init(rows: Int, cols: Int, dtype: DType = .float32, storage: any TensorStorage) {
        precondition(rows >= 0 && cols >= 0, "Tensor: negative shape \(rows)x\(cols)")
        self.rows = rows
        self.cols = cols
        self.dtype = dtype
        self.storage = storage
    }

    public var count: Int { rows * cols }
    public var byteCount: Int { count * dtype.byteSize }

    /// The whole tensor as a region.
    public var all: TensorRegion { TensorRegion(self, rows: 0..<rows, cols: 0..<cols) }

    /// Rows `rows` and columns `cols` of this tensor (the whole extent where nil), without a copy.
    public func region(rows r: Range<Int>? = nil, cols c: Range<Int>? = nil) -> TensorRegion {
        TensorRegion(self, rows: r ?? 0..<rows, cols: c ?? 0..<cols)
    }

    /// Whether `other` is the same backend memory.
    public func isSameStorage(_ other: Tensor) -> Bool { storage === other.storage }

    public var description: String { "Tensor(\(rows)x\(cols) \(dtype.rawValue))" }
}

/// A rectangle of a tensor: what BLAS calls a sub-matrix with a leading dimension.
public struct TensorRegion: Sendable, CustomStringConvertible {
    public let tensor: Tensor
    public let rows: Range<Int>
    public let cols: Range<Int>

    public init(_ tensor: Tensor, rows: Range<Int>, cols: Range<Int>) {
        precondition(rows.lowerBound >= 0 && rows.upperBound <= tensor.rows && cols.lowerBound >= 0 && cols.upperBound <= tensor.cols,
                     "region rows \(rows) cols \(cols) outside \(tensor.rows)x\(tensor.cols)")
        self.tensor = tensor
        self.rows = rows
        self.cols = cols
    }

    public var rowCount: Int { rows.count }
    public var colCount: Int { cols.count }
    /// Elements from one row to the next in the underlying tensor.
    public var leadingDimension: Int { tensor.cols }
    /// Offset of the region's first element in the tensor's row-major storage.
    public var offset: Int { rows.lowerBound * tensor.cols + cols.lowerBound }

    public var description: String { "\(tensor)[\(rows.lowerBound)..<\(rows.upperBound), \(cols.lowerBound)..<\(cols.upperBound)]" }
}
