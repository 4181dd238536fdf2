#!/usr/bin/env python3
"""Prunes the synthetic real-shape checkpoints (scripts/make-synthetic) with every method and
prints, per pruned block: seconds, the process's RSS after the block and its peak so far, bytes
read and written from storage (/proc/self/io, differenced per block), bytes on the wire
(sent + received by the coordinator, differenced per block), and the block's achieved GFLOP/s
with its ratio to the sgemm rate measured in the same run (prune --profile). A depth run
(one cheap method over every block of a model) shows whether memory stays flat in depth, and a
2-worker run over loopback gives the bytes on the wire. Standard library only."""
import argparse, json, os, random, shutil, signal, subprocess, sys, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_prune(topiary, model, method, layers, samples, seqlen, calib, out, timeout, workers=None, extra=()):
    """One prune; returns (per-block events, report.json, peak RSS of the process tree in bytes, wall s, error)."""
    if os.path.exists(out):
        shutil.rmtree(out)
    if os.path.exists(out + ".run"):
        shutil.rmtree(out + ".run")
    cmd = [topiary, "prune", "--model", model, "--method", method, "--sparsity", "0.5", "--calib", calib,
           "--calib-samples", str(samples), "--calib-seqlen", str(seqlen), "--output", out, "--json", "--profile"]
    if layers:
        cmd += ["--layers", layers]
    if workers:
        cmd += ["--workers", str(workers)]
    cmd += list(extra)
    t0 = time.time()
    err_path = out + ".stderr"
    error = None
    with open(err_path, "w") as err, open(out + ".stdout", "w") as so:
        p = subprocess.Popen(cmd, stdout=so, stderr=err, start_new_session=True)
        timed_out = []

        def stop():
            timed_out.append(True)
            try:
                os.killpg(p.pid, signal.SIGTERM)
                time.sleep(30)
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        timer = threading.Timer(timeout, stop)
        timer.daemon = True
        timer.start()
        # wait4: this prune's own peak resident set (with its waited-for children's, e.g. local workers).
        _, status, usage = os.wait4(p.pid, 0)
        timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
        peak = usage.ru_maxrss * 1024
        if timed_out:
            error = "timeout after %d s" % timeout
    wall = time.time() - t0
    events = []
    with open(err_path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                if e.get("event") == "block":
                    events.append(e)
    report = None
    rp = os.path.join(out, "report.json")
    if os.path.exists(rp):
        with open(rp) as f:
            report = json.load(f)
    if error is None and p.returncode != 0:
        tail = open(err_path).read().strip().splitlines()[-1:] or ["?"]
        error = "exit %d: %s" % (p.returncode, tail[0][:200])
    for path in (out, out + ".run"):
        shutil.rmtree(path, ignore_errors=True)
    os.remove(err_path)
    os.remove(out + ".stdout")
    return events, report, peak, wall, error


def rows_for(shape, method, events, report, wall, error):
    profile = (report or {}).get("profile") or {}
    rate = profile.get("sgemm_flops_per_second") or 0
    flops = {b["block"]: sum((c.get("flops") or 0) for c in b["phases"].values()) for b in profile.get("blocks", [])}
    rows = []
    prev = {"read_bytes": 0, "write_bytes": 0, "wire_sent_bytes": 0, "wire_received_bytes": 0}
    for e in events:
        d = {k: e.get(k, 0) - prev[k] for k in prev}
        prev = {k: e.get(k, 0) for k in prev}
        if not e.get("pruned"):
            continue
        s = e.get("seconds") or 0
        f = flops.get(e["block"], 0)
        rows.append([shape, method, str(e["block"]), "%.1f" % s,
                     "%.2f" % (e.get("rss_bytes", 0) / 2**30), "%.2f" % (e.get("peak_rss_bytes", 0) / 2**30),
                     "%.2f" % (d["read_bytes"] / 1e9), "%.2f" % (d["write_bytes"] / 1e9),
                     "%.1f" % ((d["wire_sent_bytes"] + d["wire_received_bytes"]) / 1e6),
                     "%.1f" % (f / s / 1e9) if s > 0 and f > 0 else "-",
                     "%.2f" % (f / s / rate) if s > 0 and f > 0 and rate > 0 else "-"])
    if error:
        rows.append([shape, method, "-", "%.0f" % wall, "-", "-", "-", "-", "-", "-", error])
    return rows, rate


PHASES = ["load", "dense_forward", "statistics", "solve", "pruned_forward", "error_metrics", "spill"]


def phases_for(shape, method, report):
    """One row per pruned block: each phase's seconds and its ratio to the sgemm rate."""
    rows = []
    for b in ((report or {}).get("profile") or {}).get("blocks", []):
        cells = []
        for p in PHASES:
            c = b["phases"].get(p) or {}
            r = c.get("ratio")
            cells.append("%.1f" % (c.get("seconds") or 0) + (" (%.2f)" % r if r else ""))
        rows.append([shape, method, str(b["block"])] + cells)
    return rows


def table(rows, header):
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(str(h).rjust(w) if i > 1 else str(h).ljust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    for r in rows:
        lines.append("  ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", default="llama2-7b,llama3-8b,llama3-70b")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt,sparsellm,besa")
    ap.add_argument("--methods-70b", default=None, help="methods for llama3-70b (default: --methods)")
    ap.add_argument("--blocks", type=int, default=1, help="blocks pruned per run (from block 0)")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--depth", default="llama2-7b:32", help="SHAPE:BLOCKS for the flat-memory run (wanda), or none")
    ap.add_argument("--depth-samples", type=int, default=2)
    ap.add_argument("--depth-seqlen", type=int, default=128)
    ap.add_argument("--wire", default="llama2-7b:4", help="SHAPE:BLOCKS for the 2-worker loopback run (wanda), or none")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per prune before it is stopped")
    ap.add_argument("--cache", default=os.path.join(os.environ.get("TOPIARY_CACHE", os.path.expanduser("~/.cache/topiary")), "synthetic"))
    ap.add_argument("--cache-name", default=None, help="checkpoint directories SHAPE-NAME-seed0 (e.g. 2L, from make-synthetic --layers 2) instead of the full-depth ones")
    ap.add_argument("--topiary", default=os.path.join(ROOT, ".build/release/topiary"))
    ap.add_argument("--work", default=None, help="directory for the outputs (deleted after each run)")
    a = ap.parse_args()

    work = a.work or tempfile.mkdtemp(prefix="topiary-shapes-")
    os.makedirs(work, exist_ok=True)
    # Token ids for calibration: the synthetic models have no real tokenizer worth using.
    calib = os.path.join(work, "calib-ids.txt")
    rng = random.Random(0)
    with open(calib, "w") as f:
        f.write("\n".join(str(rng.randrange(3, 32000)) for _ in range(200_000)))

    def model(shape):
        layers = 2 if shape == "llama3-70b" else 32
        return os.path.join(a.cache, "%s-%s-seed0" % (shape, a.cache_name or "%dL" % layers))

    header = ["shape", "method", "block", "seconds", "rss_GiB", "peak_GiB", "read_GB", "written_GB", "wire_MB", "GFLOP/s", "x_sgemm"]
    rows, rates, walls, phase_rows = [], [], [], []
    print("OPENBLAS_CORETYPE=%s; calibration %d x %d token ids; %d block(s) per run" %
          (os.environ.get("OPENBLAS_CORETYPE", "(unset)"), a.samples, a.seqlen, a.blocks), flush=True)
    for shape in a.shapes.split(","):
        methods = a.methods_70b if (shape == "llama3-70b" and a.methods_70b) else a.methods
        for method in ([] if methods == "none" else methods.split(",")):
            ev, rep, peak, wall, err = run_prune(a.topiary, model(shape), method, "0-%d" % (a.blocks - 1), a.samples, a.seqlen,
                                                 calib, os.path.join(work, "out"), a.timeout)
            r, rate = rows_for(shape, method, ev, rep, wall, err)
            rows += r
            phase_rows += phases_for(shape, method, rep)
            if rate:
                rates.append(rate)
            walls.append((shape, method, wall, peak))
            for x in r:
                print("  " + " ".join(x), flush=True)

    print()
    print(table(rows, header))
    if rates:
        print("sgemm rate (1024^3, measured by each run): %.1f-%.1f GFLOP/s" % (min(rates) / 1e9, max(rates) / 1e9))
    print()
    print(table([[s, m, "%.0f" % w, "%.2f" % (p / 2**30)] for s, m, w, p in walls], ["shape", "method", "run_wall_s", "peak_rss_GiB"]))
    print("(run_wall_s includes loading, the sgemm probe and writing the whole output model; peak_rss is the prune process's own (wait4))")
    if phase_rows:
        print()
        print("where each pruned block's time went (prune --profile): seconds, and in brackets the phase's ratio to the sgemm rate")
        print(table(phase_rows, ["shape", "method", "block"] + [p.replace("_forward", "_fwd") for p in PHASES]))

    if a.depth != "none":
        shape, n = a.depth.split(":")
        ev, rep, peak, wall, err = run_prune(a.topiary, model(shape), "wanda", "0-%d" % (int(n) - 1), a.depth_samples, a.depth_seqlen,
                                             calib, os.path.join(work, "out"), a.timeout)
        print()
        print("memory in depth: %s, wanda, %s blocks, %d x %d tokens%s" % (shape, n, a.depth_samples, a.depth_seqlen, " (" + err + ")" if err else ""))
        series = [[str(e["block"]), "%.2f" % (e.get("rss_bytes", 0) / 2**30), "%.2f" % (e.get("peak_rss_bytes", 0) / 2**30)] for e in ev]
        print(table(series, ["block", "rss_GiB", "peak_GiB"]))
        if len(ev) >= 4:
            p4 = ev[3].get("peak_rss_bytes", 0)
            pl = ev[-1].get("peak_rss_bytes", 0)
            print("peak RSS after 4 blocks %.2f GiB, after %d blocks %.2f GiB (growth %.1f%%)" %
                  (p4 / 2**30, len(ev), pl / 2**30, 100.0 * (pl - p4) / max(p4, 1)))

    if a.wire != "none":
        shape, n = a.wire.split(":")
        ev, rep, peak, wall, err = run_prune(a.topiary, model(shape), "wanda", "0-%d" % (int(n) - 1), a.samples, a.seqlen,
                                             calib, os.path.join(work, "out"), a.timeout, workers=2)
        r, _ = rows_for(shape, "wanda/2w", ev, rep, wall, err)
        print()
        print("2 local workers over loopback (%s, wanda, blocks 0-%d): wire_MB = bytes the coordinator sent + received for the block;" % (shape, int(n) - 1))
        print("rss/peak are the coordinator's; peak RSS of the coordinator or a worker, the larger: %.2f GiB" % (peak / 2**30))
        print(table(r, header))
    shutil.rmtree(work, ignore_errors=True) if a.work is None else None


if __name__ == "__main__":
    main()
