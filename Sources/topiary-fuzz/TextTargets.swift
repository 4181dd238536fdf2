import Foundation
import TopiaryModel
import TopiaryPrune

// MARK: JSON-lines calibration shards (prune --calib SHARD.jsonl[.gz]) and task files (eval --tasks)

/// Seed inputs: a small shard as text and gzip (made once with Python's gzip module, mtime 0,
/// from `shardText`), and a small task file.
enum TextSeeds {
    static let shardText = "{\"text\": \"Once upon a time there was a fox.\", \"url\": \"https://example.org/0\"}\n{\"text\": \"The sun came up and the birds sang in the tall green trees all morning long.\", \"url\": \"https://example.org/1\"}\n{\"text\": \"Tom had a blue boat.\", \"url\": \"https://example.org/2\"}\n{\"text\": \"Café — s'il vous plaît.\", \"url\": \"https://example.org/3\"}\n{\"text\": \"A hare laughed at a tortoise, and the tortoise said: let us race. The hare slept; the tortoise won.\", \"url\": \"https://example.org/4\"}\n{\"text\": \"The end.\", \"url\": \"https://example.org/5\"}\n"
    static let shardGzip: [UInt8] = [
        0x1F, 0x8B, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x03, 0x85, 0x91, 0x4D, 0x6A, 0xC4, 0x30, 0x0C, 0x85, 0xF7, 0x3D, 0x85, 0xF0, 0xA6, 0x9B,
        0x21, 0xE9, 0xEF, 0x26, 0x5D, 0x0D, 0x3D, 0x40, 0x37, 0xBD, 0x80, 0x26, 0xD1, 0x24, 0x06, 0xC5, 0x32, 0xB6, 0xDC, 0x09, 0x0C, 0x85, 0x1E, 0xA2,
        0x97, 0xE8, 0xA6, 0x97, 0x98, 0x9B, 0xF4, 0x24, 0x55, 0x06, 0x3A, 0x10, 0xBA, 0xC8, 0xC6, 0x20, 0xF1, 0xF4, 0xBD, 0xC7, 0xF3, 0xD1, 0x29, 0x4D,
        0xEA, 0x1A, 0x70, 0x2F, 0xA1, 0x25, 0x28, 0x51, 0x02, 0x20, 0xA8, 0x1F, 0x09, 0x74, 0xA0, 0x44, 0x70, 0xC0, 0x6C, 0x8B, 0xBD, 0x4C, 0x95, 0xDB,
        0x80, 0x2B, 0x89, 0x67, 0xED, 0xA0, 0x1A, 0x73, 0x53, 0xD7, 0x34, 0xE1, 0x18, 0x99, 0x2A, 0x49, 0x7D, 0x7D, 0xE3, 0xDE, 0xAF, 0x8E, 0x17, 0xDA,
        0xEB, 0x40, 0x90, 0x4B, 0x80, 0x16, 0xC7, 0x99, 0x0A, 0x18, 0xBA, 0x19, 0x08, 0x3B, 0x9F, 0xBA, 0x0C, 0x19, 0x43, 0x0F, 0x3E, 0x9C, 0x37, 0x8A,
        0xCC, 0xD0, 0x27, 0x22, 0x1B, 0xED, 0x35, 0x37, 0x9B, 0x47, 0x49, 0xC1, 0x9B, 0x86, 0x25, 0xF4, 0x6B, 0xC6, 0xB7, 0x4B, 0x63, 0x19, 0x61, 0xC0,
        0xCE, 0x32, 0xEF, 0xB8, 0x98, 0x9F, 0xA0, 0xAE, 0x01, 0xEE, 0x16, 0x80, 0x67, 0xDC, 0x9F, 0xBE, 0xE0, 0xE7, 0xE3, 0x13, 0xF2, 0xB5, 0x67, 0x78,
        0x93, 0x92, 0x21, 0x32, 0x9E, 0xBE, 0x57, 0x39, 0xF7, 0x0B, 0xCE, 0xD6, 0x62, 0x58, 0x7F, 0x8C, 0xA5, 0x1F, 0xC8, 0xF2, 0xE8, 0xDC, 0xAB, 0x24,
        0x15, 0x9F, 0x69, 0x73, 0xE9, 0xE3, 0x6F, 0x63, 0x95, 0xF8, 0xAE, 0x01, 0x26, 0x05, 0xF3, 0x4B, 0xD8, 0x52, 0x05, 0x73, 0x87, 0x67, 0x46, 0x66,
        0x8A, 0xFA, 0xB4, 0xD4, 0x1F, 0x24, 0xAC, 0xE5, 0x79, 0xF8, 0xF7, 0x23, 0x14, 0xBA, 0xB5, 0xA3, 0x47, 0x3B, 0xFA, 0x05, 0x5A, 0x2F, 0xEA, 0x22,
        0x15, 0x02, 0x00, 0x00,
    ]
    static let tasksText = "{\"context\": \"Once upon a time, there was a little girl named\", \"choices\": [\"Lily\", \"table\"], \"gold\": 0}\n{\"context\": \"The cat sat on the \", \"choices\": [\"mat\", \"café\", \"sky\"], \"gold\": 0}\n{\"context\": \"\", \"choices\": [\"Once\", \"Zebra\"], \"gold\": 1}\n"
}

/// Shards, plain or gzip (mutated compressed bytes reach zlib's error paths), read and sampled
/// with the C4 sampler at window lengths some or all documents are too short for: every case
/// must end, with windows or with an error.
struct ShardTarget: FuzzTarget {
    let name = "calib-shard"

    func load(_ file: FuzzFile, directory: String, _ r: inout FuzzRandom) -> CaseOutcome {
        writeFiles([file], to: directory)
        var steps = Steps()
        let seqlen = r.pick([1, 4, 16, 64, 200, 100_000])
        let samples = 1 + r.below(4)
        let seed = r.below(1 << 20)
        steps.attempt {
            let shard = try DocumentShard.read(path: directory + "/" + file.name)
            // Bytes as tokens: enough to exercise every branch of the sampler.
            _ = try DocumentWindows.sample(shard: shard, samples: samples, sequenceLength: seqlen, seed: seed,
                                           tokenize: { Array($0.utf8).map(Int.init) })
        }
        return steps.outcome
    }

    func run(_ r: inout FuzzRandom, directory: String) -> CaseOutcome {
        let gz = r.chance(0.5)
        var file = gz ? FuzzFile(name: "shard.jsonl.gz", bytes: TextSeeds.shardGzip)
                      : FuzzFile(name: "shard.jsonl", bytes: Array(TextSeeds.shardText.utf8), isText: true)
        Mutator.mutate(&file, donors: [Array(TextSeeds.shardText.utf8), TextSeeds.shardGzip], &r, rounds: r.pick([0, 1, 1, 2, 4]))
        return load(file, directory: directory, &r)
    }

    func checkSeeds(directory: String) -> [String] {
        var r = FuzzRandom(seed: 1)
        return [FuzzFile(name: "shard.jsonl", bytes: Array(TextSeeds.shardText.utf8)), FuzzFile(name: "shard.jsonl.gz", bytes: TextSeeds.shardGzip)]
            .compactMap { f in
                writeFiles([f], to: directory)
                do {
                    let shard = try DocumentShard.read(path: directory + "/" + f.name)
                    _ = try DocumentWindows.sample(shard: shard, samples: 4, sequenceLength: 16, seed: 0, tokenize: { Array($0.utf8).map(Int.init) })
                } catch { return "calib-shard seed \(f.name): \(error)" }
                _ = r.next()
                return nil
            }
    }
}

/// Multiple-choice task files (eval --tasks): parsed, or refused naming the line and field.
struct TasksTarget: FuzzTarget {
    let name = "tasks"

    func run(_ r: inout FuzzRandom, directory: String) -> CaseOutcome {
        var file = FuzzFile(name: "tasks.jsonl", bytes: Array(TextSeeds.tasksText.utf8), isText: true)
        Mutator.mutate(&file, donors: [Array(TextSeeds.tasksText.utf8), Array(TextSeeds.shardText.utf8)], &r, rounds: r.pick([1, 1, 2, 4]))
        var steps = Steps()
        steps.attempt { _ = try MultipleChoice.parse(Data(file.bytes), path: "tasks.jsonl") }
        return steps.outcome
    }

    func checkSeeds(directory: String) -> [String] {
        do { _ = try MultipleChoice.parse(Data(TextSeeds.tasksText.utf8), path: "tasks.jsonl") } catch { return ["tasks seed: \(error)"] }
        return []
    }
}
