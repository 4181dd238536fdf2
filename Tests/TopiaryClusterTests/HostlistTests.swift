import XCTest
@testable import TopiaryCluster

final class HostlistTests: XCTestCase {
    func testSlurmHostListsExpand() throws {
        XCTAssertEqual(try Hostlist.expand("node[01-04,07],gpu-a[1-2]"),
                       ["node01", "node02", "node03", "node04", "node07", "gpu-a1", "gpu-a2"])
        XCTAssertEqual(try Hostlist.expand("login1"), ["login1"])
        XCTAssertEqual(try Hostlist.expand("a1,b2"), ["a1", "b2"])
        XCTAssertEqual(try Hostlist.expand("n[8-11]"), ["n8", "n9", "n10", "n11"])
        XCTAssertEqual(try Hostlist.expand("n[098-101]"), ["n098", "n099", "n100", "n101"])
        XCTAssertEqual(try Hostlist.expand("r[1-2]n[1-2]"), ["r1n1", "r1n2", "r2n1", "r2n2"])
        XCTAssertEqual(try Hostlist.expand("127.0.0.[1-3]"), ["127.0.0.1", "127.0.0.2", "127.0.0.3"])
        XCTAssertEqual(try Hostlist.expand("x[3],y-[5-6]z"), ["x3", "y-5z", "y-6z"])
    }

    func testMalformedHostListsAreRefused() {
        for bad in ["n[1-", "n1-2]", "n[a-b]", "n[5-2]", "n[1,,2]", "", "n[-3]"] {
            XCTAssertThrowsError(try Hostlist.expand(bad), bad) { error in
                XCTAssertTrue("\(error)".contains("host list"), "\(error)")
            }
        }
    }

    /// Each malformed range says what is wrong with it, and no list expands past the limit.
    func testEachMalformedRangeSaysWhatIsWrong() {
        for (bad, expected) in [("n[0-99999999999999999999999]", "too large to be a host's index"), ("n[5-1]", "runs backwards"),
                                ("n[0-100000]", "names 100001 hosts"), ("n[0-999]m[0-999]", "more than the 100000 hosts"),
                                ("n[x]", "is not a number")] {
            XCTAssertThrowsError(try Hostlist.expand(bad), bad) { error in
                XCTAssertTrue("\(error)".contains(expected) && "\(error)".contains(bad), "\(bad): \(error)")
            }
        }
        XCTAssertEqual(try Hostlist.expand("n[0-99]m[0-999]").count, 100_000)
    }

    func testSlurmTaskCountsExpand() throws {
        XCTAssertEqual(try Hostlist.taskCounts("2(x3),1"), [2, 2, 2, 1])
        XCTAssertEqual(try Hostlist.taskCounts("1"), [1])
        XCTAssertEqual(try Hostlist.taskCounts("4(x1)"), [4])
        XCTAssertEqual(try Hostlist.taskCounts("1(x2),16,3(x2)"), [1, 1, 16, 3, 3])
        for bad in ["", "0", "2(x0)", "2(3)", "2(x3", "x2", "2,,1", "-1", "2(x)", "a"] {
            XCTAssertThrowsError(try Hostlist.taskCounts(bad), bad) { error in
                XCTAssertTrue("\(error)".contains("tasks per node"), "\(error)")
            }
        }
    }
}
