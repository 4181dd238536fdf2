// swift-tools-version:6.0
// Topiary: global, coordinated pruning of large language models.
// No package dependencies: system C libraries come in through system-library targets.
import PackageDescription

let package = Package(
    name: "Topiary",
    products: [
        .executable(name: "topiary", targets: ["topiary"]),
    ],
    targets: [
        .systemLibrary(
            name: "CBLAS",
            path: "Sources/CBLAS",
            providers: [.apt(["libopenblas-dev", "liblapacke-dev"])]
        ),
        .systemLibrary(
            name: "CCrypto",
            path: "Sources/CCrypto",
            providers: [.apt(["libssl-dev"])]
        ),
        .systemLibrary(
            name: "CZlib",
            path: "Sources/CZlib",
            providers: [.apt(["zlib1g-dev"])]
        ),
        // Our own small C kernels (no third-party code): CRC-32C for wire frames, malloc settings,
        // streaming writeback of large output files.
        .target(name: "CTopiarySupport"),
        // The forward pass's element-wise kernels (exponentials, softmax sums, SwiGLU) in vectors
        // for AVX-512, AVX2 or baseline x86-64, chosen at load time; the same bits on all three.
        .target(name: "CTopiaryKernels"),
        .target(name: "TopiaryTensor", dependencies: ["CBLAS", "CTopiaryKernels"]),
        .target(name: "TopiaryTokenizers"),
        .target(name: "TopiaryModel", dependencies: ["TopiaryTensor", "TopiaryTokenizers", "CCrypto", "CTopiarySupport"]),
        .target(name: "TopiaryPrune", dependencies: ["TopiaryModel", "TopiaryTensor", "CZlib"]),
        .target(name: "TopiaryCluster", dependencies: ["TopiaryPrune", "TopiaryModel", "TopiaryTensor", "CTopiarySupport", "CCrypto"]),
        .executableTarget(name: "topiary", dependencies: ["TopiaryCluster", "TopiaryPrune", "TopiaryModel", "TopiaryTensor", "CTopiarySupport"]),
        // Benchmarks behind scripts/bench: ratios against the machine's own measured rates.
        .executableTarget(name: "topiary-bench", dependencies: ["TopiaryCluster", "TopiaryPrune", "TopiaryModel", "TopiaryTensor", "CTopiarySupport"]),
        // Seeded fuzzers for the readers and the wire decoders, behind scripts/fuzz and FuzzTests.
        .executableTarget(name: "topiary-fuzz", dependencies: ["TopiaryCluster", "TopiaryModel", "TopiaryPrune", "TopiaryTokenizers", "TopiaryTensor"]),
        // Paths to ../shared and temporary directories, shared by the test targets.
        .target(name: "TopiaryTestSupport", dependencies: ["TopiaryTensor"], path: "Tests/TopiaryTestSupport"),
        .testTarget(name: "TopiaryTensorTests", dependencies: ["TopiaryTensor", "CTopiaryKernels", "TopiaryTestSupport"]),
        // ChatTemplates/ holds test data (chat templates, their expected renders), read through #filePath.
        .testTarget(name: "TopiaryTokenizersTests", dependencies: ["TopiaryTokenizers", "TopiaryTestSupport"], exclude: ["ChatTemplates"]),
        .testTarget(name: "TopiaryModelTests", dependencies: ["TopiaryModel", "TopiaryTensor", "TopiaryTokenizers", "TopiaryTestSupport"]),
        .testTarget(name: "TopiaryPruneTests", dependencies: ["TopiaryPrune", "TopiaryModel", "TopiaryTensor", "TopiaryTestSupport"]),
        .testTarget(name: "TopiaryClusterTests", dependencies: ["TopiaryCluster", "TopiaryTensor", "TopiaryTestSupport"]),
        .testTarget(name: "CLITests", dependencies: ["topiary", "TopiaryTestSupport"]),
        .testTarget(name: "FuzzTests", dependencies: ["topiary-fuzz", "TopiaryTestSupport"]),
    ]
)
