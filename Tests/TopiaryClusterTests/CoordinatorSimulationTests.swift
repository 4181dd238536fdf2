import Foundation
import XCTest
import TopiaryModel
import TopiaryPrune
import TopiaryTensor
import TopiaryTestSupport
@testable import TopiaryCluster

/// The coordinator against simulated workers that drop, stall, reorder, return short, corrupt
/// or stale results and die at any message (CoordinatorSimulation.swift). Each schedule comes
/// from one seed; a failure prints the seed, and TOPIARY_SIM_SEED=0x... replays it.
///
///     TOPIARY_SIM_SCHEDULES=100000   more schedules (scripts/fuzz coordinator)
///     TOPIARY_SIM_SECONDS=600        stop starting schedules after this long
///     TOPIARY_SIM_SEED=0x...         the first seed (with TOPIARY_SIM_SCHEDULES=1: that one schedule, traced)
///     TOPIARY_SIM_FAULTS=die,short   inject only these faults (SimulatedFault's names)
///     TOPIARY_SIM_TRACE=1            print the faults and the coordinator's log of every failed schedule
final class CoordinatorSimulationTests: XCTestCase {
    static let defaultSchedules = 3000
    static let defaultFirstSeed: UInt64 = 0x7090_1a12_0000_0000

    func simulation() throws -> CoordinatorSimulation {
        // Block files go to tmpfs when there is one: the schedules write thousands.
        let shm = "/dev/shm"
        var root = try makeTemporaryDirectory("coordinator-simulation").path
        if FileManager.default.isWritableFile(atPath: shm) {
            root = shm + "/topiary-simulation-\(getpid())-\(UUID().uuidString)"
            try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
            addTeardownBlock { try? FileManager.default.removeItem(atPath: root) }
        }
        return CoordinatorSimulation(root: root)
    }

    static func environmentSeed(_ name: String) -> UInt64? {
        guard let text = ProcessInfo.processInfo.environment[name] else { return nil }
        return text.hasPrefix("0x") ? UInt64(text.dropFirst(2), radix: 16) : UInt64(text)
    }

    /// The harness's undisturbed runs against an independent computation: sequential
    /// coordination over any number of simulated workers gives the single-process pipeline's
    /// blocks bit for bit.
    func testUndisturbedRunsMatchTheSingleProcessRun() throws {
        let sim = try simulation()
        for method in [PruneMethod.wanda, .sparsellm] {
            for layers in [nil, 1...4] as [ClosedRange<Int>?] {
                let dir = try makeTemporaryDirectory("single").path
                let job = sim.job(SimulationSetup(coordination: .sequential, method: method, layers: layers, workers: 1, spares: 0), directory: dir)
                let store = try BlockFileStore(directory: dir + "/blocks")
                let reports = try PrunePipeline(model: sim.model, job: job, store: store).run { _, _ in }
                let single = try sim.digest(store, job: job)
                for workers in 1...4 {
                    let setup = SimulationSetup(coordination: .sequential, method: method, layers: layers, workers: workers, spares: 0)
                    let output = try sim.expected(setup)
                    XCTAssertEqual(output.digest, single, "\(setup)")
                    XCTAssertEqual(output.reports, reports.map { "\($0.block): \($0.outputError)" }, "\(setup)")
                }
            }
        }
        // ADMM with infinite rho and as many rounds as partitions (none stopped early) gives the
        // sequential weights in its last round.
        let admm = try sim.expected(SimulationSetup(coordination: .admm, method: .wanda, layers: nil, workers: 3, spares: 0, rounds: 3,
                                                    keep: .last, minImprovement: 0))
        XCTAssertEqual(admm.digest, try sim.expected(SimulationSetup(coordination: .sequential, method: .wanda, layers: nil, workers: 3, spares: 0)).digest)
    }

    /// Thousands of seeded schedules: each ends with the undisturbed output or a clean error,
    /// never commits a block twice and never hands out a finished block again.
    func testRandomSchedules() throws {
        let env = ProcessInfo.processInfo.environment
        let count = env["TOPIARY_SIM_SCHEDULES"].flatMap { Int($0) } ?? Self.defaultSchedules
        let budget = env["TOPIARY_SIM_SECONDS"].flatMap { Double($0) } ?? .infinity
        let first = Self.environmentSeed("TOPIARY_SIM_SEED") ?? Self.defaultFirstSeed
        var allowed = Set(SimulatedFault.allCases)
        if let names = env["TOPIARY_SIM_FAULTS"] {
            allowed = Set(try names.split(separator: ",").map { name in
                guard let f = SimulatedFault(rawValue: String(name)) else { throw SimulationAbort(description: "TOPIARY_SIM_FAULTS: no fault '\(name)'") }
                return f
            })
        }
        let sim = try simulation()
        CrashNote.install()
        defer { CrashNote.clear() }
        // The blocks are tiny: BLAS threads would only hand work to each other.
        let threads = CPUBackend.threadCount
        CPUBackend.setThreadCount(1)
        defer { CPUBackend.setThreadCount(threads) }
        sim.echoTrace = count == 1
        let faultsText = allowed.count == SimulatedFault.allCases.count ? "" : " TOPIARY_SIM_FAULTS=" + allowed.map(\.rawValue).sorted().joined(separator: ",")
        let started = Date()
        var completed = 0, cleanErrors = 0
        var failures: [ScheduleResult] = []
        var injected: [SimulatedFault: Int] = [:]
        var coordinations: [Coordination: Int] = [:]
        var run = 0
        for n in 0..<count where Date().timeIntervalSince(started) < budget {
            let seed = first &+ UInt64(n)
            run += 1
            let hex = String(format: "0x%016llx", seed)
            var draw = SplitMix(seed: seed)
            CrashNote.set("coordinator simulation: the schedule of seed \(hex) (\(SimulationSetup.draw(&draw))) crashed (replay: TOPIARY_SIM_SEED=\(hex) TOPIARY_SIM_SCHEDULES=1\(faultsText))")
            let r = sim.run(seed: seed, allowed: allowed)
            injected.merge(r.injected, uniquingKeysWith: +)
            coordinations[r.setup.coordination, default: 0] += 1
            if !r.failures.isEmpty {
                failures.append(r)
                if failures.count >= 20 { break }
            } else if r.error != nil {
                cleanErrors += 1
            } else {
                completed += 1
            }
        }
        let seconds = Date().timeIntervalSince(started)
        let faults = SimulatedFault.allCases.map { "\($0.rawValue) \(injected[$0] ?? 0)" }.joined(separator: ", ")
        print(String(format: "coordinator simulation: %d schedules (seeds 0x%016llx-0x%016llx) in %.1f s: %d completed with the undisturbed output, %d ended with an injected job error, %d failed; %d sequential, %d admm",
                     run, first, first &+ UInt64(run - 1), seconds, completed, cleanErrors,
                     failures.count, coordinations[.sequential] ?? 0, coordinations[.admm] ?? 0))
        print("coordinator simulation: faults injected: \(faults)")
        // The line scripts/fuzz sums up.
        print(String(format: "coordinator: %d cases, %d failed (%d ended with an injected job error), %.0f s", run, failures.count, cleanErrors, seconds))
        if count != 1 && env["TOPIARY_SIM_TRACE"] != nil {
            for f in failures { print("trace of \(f.reproduction):\n  " + f.trace.joined(separator: "\n  ")) }
        }
        for f in failures {
            XCTFail("coordinator simulation failed: \(f.reproduction) (replay: TOPIARY_SIM_SEED=\(String(format: "0x%016llx", f.seed ?? 0)) TOPIARY_SIM_SCHEDULES=1\(faultsText))")
        }
        XCTAssertGreaterThan(completed, run / 2, "most schedules should complete")
    }
}

/// Hand-written schedules for the faults the simulation found the coordinator mishandling
/// (docs/run-directory.md, "Simulation"). Each runs against the undisturbed output.
final class CoordinatorFaultRegressionTests: XCTestCase {
    var sim: CoordinatorSimulation!

    override func setUpWithError() throws {
        sim = CoordinatorSimulation(root: try makeTemporaryDirectory("coordinator-faults").path)
        // The schedules below name assignments as the dense pass numbered them one partition
        // after another; the random schedules (CoordinatorSimulationTests) run it pipelined.
        sim.denseMicroBatches = 1
        // The blocks are tiny: BLAS threads would only hand work to each other.
        let threads = CPUBackend.threadCount
        CPUBackend.setThreadCount(1)
        addTeardownBlock { CPUBackend.setThreadCount(threads) }
    }

    /// Runs `setup` with `script` (worker index: its faults) and expects the undisturbed output.
    @discardableResult
    func expectUndisturbed(_ setup: SimulationSetup, _ script: [Int: [ScriptedFault]], abandoned: [String],
                           file: StaticString = #filePath, line: UInt = #line) throws -> ScheduleResult {
        let plans = (0..<(setup.workers + setup.spares)).map { FaultPlan.scripted(script[$0] ?? []) }
        let r = sim.run(setup, plans: plans, seed: nil, expected: try sim.expected(setup))
        XCTAssertEqual(r.failures, [], "\(setup) \(script)\n  " + r.trace.joined(separator: "\n  "), file: file, line: line)
        XCTAssertNil(r.error, "\(setup)", file: file, line: line)
        XCTAssertNotNil(r.output, "\(setup)", file: file, line: line)
        XCTAssertEqual(r.abandoned, abandoned, "\(setup) \(script)", file: file, line: line)
        for (k, faults) in script {
            for f in faults { XCTAssertEqual(r.injected[f.fault] ?? 0 > 0, true, "w\(k)'s \(f.fault) never happened: \(r.trace)", file: file, line: line) }
        }
        return r
    }

    func fault(_ step: SimulationStep, _ fault: SimulatedFault, assignment: Int = 0, variant: Int = 0) -> ScriptedFault {
        ScriptedFault(assignment: assignment, step: step, fault: fault, variant: variant)
    }

    /// (a) A worker that returns its boundary after fewer blocks than its range (found as seed
    /// 0x70901a1200000003): the boundary was taken as the range's, the missing blocks were never
    /// pruned, and the run failed at the end reading them. Now the worker is lost and the rest of
    /// its range is redone from the last block it sent.
    func testShortRangeIsRedoneElsewhere() throws {
        for coordination in Coordination.allCases {
            let setup = SimulationSetup(coordination: coordination, method: .wanda, layers: nil, workers: 2, spares: 1)
            let firstRound = coordination == .admm ? 1 : 0  // ADMM's dense pass is assignment 0
            try expectUndisturbed(setup, [0: [fault(.block(1), .short, assignment: firstRound)]], abandoned: ["w0"])
            try expectUndisturbed(setup, [1: [fault(.block(0), .short, assignment: firstRound)]], abandoned: ["w1"])
            try expectUndisturbed(setup, [0: [fault(.block(0), .skip, assignment: firstRound)]], abandoned: ["w0"])
        }
    }

    /// (b) Stale or duplicate results (found as seeds 0x70901a1200000013, duplicate, and
    /// 0x70901a1200000004, out of range): a block already committed, or outside the range, was
    /// written and counted again. Now any block but the next of the range is refused before it is
    /// written; the worker is lost and the range redone elsewhere, each block committed once.
    func testStaleDuplicateAndOutOfRangeBlocksAreRefused() throws {
        for coordination in Coordination.allCases {
            let setup = SimulationSetup(coordination: coordination, method: .wanda, layers: nil, workers: 3, spares: 0)
            let a = coordination == .admm ? 1 : 0
            for f in [SimulatedFault.duplicateBlock, .staleBlock, .outOfRangeBlock, .reorder] {
                for k in 0..<3 { try expectUndisturbed(setup, [k: [fault(.block(0), f, assignment: a)]], abandoned: ["w\(k)"]) }
                // At a range's last block (each range here has two) there is no next block to reorder.
                if f != .reorder { try expectUndisturbed(setup, [1: [fault(.block(1), f, assignment: a, variant: 1)]], abandoned: ["w1"]) }
            }
        }
    }

    /// Results with the wrong tensors, shapes, index, report or non-finite weights, and boundaries
    /// of the wrong shape, without their targets, non-finite or stale (found as seeds
    /// 0x70901a1200000021 and 0x70901a1200000019): refused, the worker lost, the range redone.
    func testCorruptAndStaleResultsAreRefused() throws {
        for coordination in Coordination.allCases {
            let setup = SimulationSetup(coordination: coordination, method: .sparsellm, layers: nil, workers: 2, spares: 1)
            let a = coordination == .admm ? 1 : 0
            for variant in 0..<8 {
                try expectUndisturbed(setup, [1: [fault(.block(variant % 2), .corruptBlock, assignment: a, variant: variant)]], abandoned: ["w1"])
            }
            for variant in 0..<8 {
                try expectUndisturbed(setup, [0: [fault(.boundary, .corruptBoundary, assignment: a, variant: variant)]], abandoned: ["w0"])
            }
            try expectUndisturbed(setup, [1: [fault(.boundary, .staleBoundary, assignment: a)]], abandoned: ["w1"])
        }
        // Blocks outside --layers are only run: weights for one are refused too.
        let layered = SimulationSetup(coordination: .sequential, method: .wanda, layers: 1...4, workers: 2, spares: 0)
        try expectUndisturbed(layered, [0: [fault(.block(0), .corruptBlock)]], abandoned: ["w0"])
    }

    /// (d) ADMM starts every partition before it collects any. A replacement chosen for a
    /// partition was given a second range while it still held one: a remote worker picked for a
    /// partition that was not started (it has blocks outside --layers) after being started for the
    /// next one, and the in-process fallback picked again for a lost worker's rest while it held a
    /// later partition (its pending range overwritten, then a trap: "finish without start").
    /// Now a link holds one range at a time (the simulated workers check it) and every range run
    /// in this process gets its own in-process worker.
    func testBusyReplacementIsNotGivenASecondRange() throws {
        // w0 refuses the dense pass; in round 1 partition 0 (blocks 0-1, block 0 only run) is not
        // started, and its replacement w1 is started for partition 1.
        let layered = SimulationSetup(coordination: .admm, method: .wanda, layers: 1...4, workers: 3, spares: 0)
        try expectUndisturbed(layered, [0: [fault(.start, .refuse)]], abandoned: ["w0"])
        // w0 and w1 refuse the dense pass, so in round 1 w2 takes partition 0 and this process
        // partition 1; w2 then dies in the middle of partition 0, whose rest runs here too.
        let setup = SimulationSetup(coordination: .admm, method: .wanda, layers: nil, workers: 3, spares: 0)
        try expectUndisturbed(setup, [0: [fault(.start, .refuse)], 1: [fault(.start, .refuse)], 2: [fault(.block(1), .die, assignment: 3)]],
                              abandoned: ["w0", "w1", "w2"])
    }

    /// The seeds that first showed each defect, with the faults they were run with (before the
    /// fixes: a short or skipped range left blocks never pruned; a duplicate, stale or
    /// out-of-range block was committed again or past the range; a corrupt block or a stale
    /// boundary changed the output; a boundary of the wrong width trapped; a busy in-process
    /// replacement trapped). Replayed whole, they now end with the undisturbed output.
    func testSeedsThatFoundTheDefects() throws {
        let sim = try CoordinatorSimulation(root: makeTemporaryDirectory("coordinator-seeds").path)
        sim.denseMicroBatches = 1
        let found: [(UInt64, [SimulatedFault])] = [
            (0x7090_1a12_0000_000a, [.short]), (0x7090_1a12_0000_0019, [.skip]), (0x7090_1a12_0000_0003, SimulatedFault.allCases),
            (0x7090_1a12_0000_000a, [.duplicateBlock]), (0x7090_1a12_0000_000a, [.staleBlock]), (0x7090_1a12_0000_0008, [.outOfRangeBlock]),
            (0x7090_1a12_0000_0013, SimulatedFault.allCases), (0x7090_1a12_0000_0009, [.corruptBlock]),
            (0x7090_1a12_0000_0004, [.corruptBoundary]), (0x7090_1a12_0000_000e, [.staleBoundary]),
            (0x7090_1a12_0000_0044, [.refuse, .stallAtStart]), (0x7090_1a12_0000_0028, [.refuse, .stallAtStart, .die, .stall, .dieAtBoundary]),
        ]
        for (seed, faults) in found {
            let r = sim.run(seed: seed, allowed: Set(faults))
            XCTAssertEqual(r.failures, [], r.reproduction)
            XCTAssertFalse(r.injected.isEmpty, "seed \(String(seed, radix: 16)) injected no fault")
        }
    }
}
