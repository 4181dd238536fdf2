import XCTest
@testable import TopiaryCluster

final class ProcessResourcesTests: XCTestCase {
    // The kernel pads /proc/PID/status numbers to 8 characters: from 10^7 kB (9.5 GiB) on, the
    // digits follow the tab directly. A 70B block's prune peaks at 13.8 GiB, which the old parser
    // (split on spaces) read as no value, so report.json said peak_rss_bytes 0.
    func testStatusValuesOfEveryWidth() {
        let text = "Name:\ttopiary\nVmPeak:\t17700000 kB\nVmHWM:\t14463048 kB\nVmRSS:\t  969260 kB\nThreads:\t5\n"
        XCTAssertEqual(ProcessResources.statusBytes(text, key: "VmHWM"), 14_463_048 * 1024)
        XCTAssertEqual(ProcessResources.statusBytes(text, key: "VmRSS"), 969_260 * 1024)
        XCTAssertEqual(ProcessResources.statusBytes(text, key: "Threads"), 5)
        XCTAssertNil(ProcessResources.statusBytes(text, key: "VmSwap"))
        XCTAssertNil(ProcessResources.statusBytes(nil, key: "VmHWM"))
    }

    func testIOBytes() {
        let text = "rchar: 816119264\nwchar: 809538470\nsyscr: 199056\nsyscw: 19\nread_bytes: 10057646080\nwrite_bytes: 809644032\ncancelled_write_bytes: 0\n"
        let io = ProcessResources.ioBytes(text)
        XCTAssertEqual(io?.read, 10_057_646_080)
        XCTAssertEqual(io?.write, 809_644_032)
        XCTAssertNil(ProcessResources.ioBytes("rchar: 1\n"))
    }

    func testThisProcess() throws {
        #if os(Linux)
        XCTAssertGreaterThan(try XCTUnwrap(ProcessResources.residentBytes), 0)
        XCTAssertGreaterThan(try XCTUnwrap(ProcessResources.peakResidentBytes), 0)
        // Peak and now from one snapshot (other tests allocate between two reads of the file).
        let status = try String(contentsOfFile: "/proc/self/status", encoding: .utf8)
        let now = try XCTUnwrap(ProcessResources.statusBytes(status, key: "VmRSS"))
        XCTAssertGreaterThanOrEqual(try XCTUnwrap(ProcessResources.statusBytes(status, key: "VmHWM")), now)
        #endif
    }

    // MARK: the memory this process may use

    static let physical = 24 << 30

    func testControlGroupV1LimitOfTheGroupOrAnAncestor() {
        // This VM's layout: v1 hierarchies under /sys/fs/cgroup, the memory one with a group per job.
        let mountinfo = """
        31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
        32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
        35 31 0:32 / /sys/fs/cgroup/memory rw,relatime shared:15 - cgroup cgroup rw,memory
        41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
        """
        let cgroup = "9:name=systemd:/\n4:memory:/slurm/uid_0/job_7/step_0\n1:cpu:/\n0::/\n"
        var files = ["/sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
                     "/sys/fs/cgroup/memory/slurm/uid_0/job_7/memory.limit_in_bytes": "8589934592\n",
                     "/sys/fs/cgroup/memory/slurm/uid_0/job_7/step_0/memory.limit_in_bytes": "9223372036854771712\n"]
        var limit = MemoryLimit.resolve(physical: Self.physical, cgroup: cgroup, mountinfo: mountinfo) { files[$0] }
        // The job's 8 GiB binds the step below it, whose own file says "no limit".
        XCTAssertEqual(limit, MemoryLimit(bytes: 8 << 30, source: "/sys/fs/cgroup/memory/slurm/uid_0/job_7/memory.limit_in_bytes"))
        // A limit above the machine's memory is no limit.
        files["/sys/fs/cgroup/memory/slurm/uid_0/job_7/memory.limit_in_bytes"] = "\(64 << 30)"
        limit = MemoryLimit.resolve(physical: Self.physical, cgroup: cgroup, mountinfo: mountinfo) { files[$0] }
        XCTAssertEqual(limit, MemoryLimit(bytes: Self.physical, source: "physical memory"))
    }

    func testControlGroupV2MaxAndContainerRoots() {
        let mountinfo = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
        let cgroup = "0::/system.slice/slurmstepd.scope/job_42/step_batch/user/task_0\n"
        let files = ["/sys/fs/cgroup/system.slice/slurmstepd.scope/job_42/memory.max": "17179869184\n",
                     "/sys/fs/cgroup/system.slice/slurmstepd.scope/job_42/step_batch/memory.max": "max\n",
                     "/sys/fs/cgroup/system.slice/memory.max": "max\n"]
        XCTAssertEqual(MemoryLimit.resolve(physical: Self.physical, cgroup: cgroup, mountinfo: mountinfo) { files[$0] },
                       MemoryLimit(bytes: 16 << 30, source: "/sys/fs/cgroup/system.slice/slurmstepd.scope/job_42/memory.max"))
        // A container mounts its own group as the root: /proc/self/cgroup says "0::/" and the
        // limit is in the mount's top file.
        let inside = MemoryLimit.resolve(physical: Self.physical, cgroup: "0::/\n", mountinfo: mountinfo) {
            $0 == "/sys/fs/cgroup/memory.max" ? "2147483648" : nil
        }
        XCTAssertEqual(inside, MemoryLimit(bytes: 2 << 30, source: "/sys/fs/cgroup/memory.max"))
        // A v1 mount of a group below the hierarchy's root (Docker's /docker/ID), with an escaped space.
        let docker = "50 40 0:32 /docker/abc /sys/fs/cgroup/mem\\040ory ro - cgroup cgroup rw,memory\n"
        let limited = MemoryLimit.resolve(physical: Self.physical, cgroup: "4:memory:/docker/abc/inner\n", mountinfo: docker) {
            $0 == "/sys/fs/cgroup/mem ory/inner/memory.limit_in_bytes" ? "1073741824" : nil
        }
        XCTAssertEqual(limited.bytes, 1 << 30)
    }

    func testNoControlGroupMeansThePhysicalMemory() {
        let none = MemoryLimit(bytes: Self.physical, source: "physical memory")
        XCTAssertEqual(MemoryLimit.resolve(physical: Self.physical, cgroup: nil, mountinfo: nil) { _ in nil }, none)
        // Garbage in the files is no limit, never a crash.
        let mountinfo = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\nnot a mount line\n - \n"
        for junk in ["", "-5", "0", "12abc", "max max", String(repeating: "9", count: 40)] {
            XCTAssertEqual(MemoryLimit.resolve(physical: Self.physical, cgroup: "0::/a\n0::\n:::\n", mountinfo: mountinfo) { _ in junk }, none, junk)
        }
        XCTAssertEqual(MemoryLimit.describe(1536 << 20), "1.5 GiB")
        XCTAssertEqual(MemoryLimit.describe(100), "100 B")
    }

    func testThisProcessLimit() {
        let limit = MemoryLimit.current
        XCTAssertGreaterThan(limit.bytes, 0)
        XCTAssertLessThanOrEqual(limit.bytes, Int(clamping: ProcessInfo.processInfo.physicalMemory))
    }
}
