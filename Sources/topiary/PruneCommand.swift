import Foundation
import TopiaryCluster
import TopiaryModel
import TopiaryPrune
import TopiaryTensor
import TopiaryTokenizers

enum PruneCommand: Command {
    static let name = "prune"
    static let summary = "prune a model (magnitude, wanda, sparsegpt, sparsellm, besa) and write it as a Hugging Face directory"
    static let usage = """
    topiary prune --model PATH --method magnitude|wanda|sparsegpt|sparsellm|besa (--sparsity S | --pattern N:M)
                  --calib FILE|generate:N[:L] [--calib-samples N] [--calib-seqlen L] [--seed S] --output DIR
                  [--layers A-B] [--eval-text FILE --eval-windows K --eval-seqlen L [--skip-dense-eval]] [--json] [--profile] [--linear-errors]
                  [--workers N | --hosts H:P,... [--weights path|send]] [--coordination sequential|admm [--rounds R --rho X --tolerance E --min-improvement F --keep-round best|last]]
                  [--besa-epochs E --besa-lr X --besa-lr-schedule constant|cosine --besa-penalty B --besa-granularity row|layer --besa-reconstruct]
                  [--run-dir D] [--overwrite] [--precision f32|f64] [--heartbeat-interval S --heartbeat-timeout S] [--threads N] [--memory-budget SIZE]
    topiary prune --resume D [--workers N | --hosts H:P,...] [--threads N]
    """
    static let details = """
    Calibration: --calib-samples windows of --calib-seqlen tokens drawn from --calib, a UTF-8
    text tokenized whole (or a file of token ids: a JSON array, or integers separated by spaces,
    commas or newlines). Window starts are drawn as the reference scripts draw them: Python's
    random.seed(S), then random.randint(0, ntokens - seqlen - 1) per sample.
    A JSON-lines shard (a name ending in .jsonl, .jsonl.gz or .json.gz, such as C4's
    c4-train.00000-of-01024.json.gz: one JSON object a line with the document in a string field
    'text'; gzip or plain) is sampled as the references' C4 loader samples it: after
    random.seed(S), per sample, random.randint(0, documents - 1) picks a document, tokenized
    alone with the tokenizer's default special tokens, again until one has more than --calib-seqlen
    tokens; the window starts at random.randint(0, tokens - seqlen - 1). Blank lines are not
    documents; a line that is not such an object is an error naming the line.
    --calib generate:N[:L] needs no data (self-calibration, Williams et al. 2024, arXiv 2410.17170):
    N sequences of L tokens (default --calib-seqlen) sampled from the model being pruned, each
    starting from its BOS token, sampling after the EOS token continuing like any other; each of
    the L-1 tokens sampled is drawn from softmax(logits/T) at T = 1 (the model's own distribution;
    docs/evaluation.md says why), by a SplitMix64 per sequence seeded from --seed, 16 sequences
    at a time with a KV cache (the whole model in memory), so the same command gives the same
    tokens on any thread count. N replaces --calib-samples (a different --calib-samples, or a
    --calib-seqlen other than L, is refused). Each sequence is one window. The tokens and their
    settings are cached in the run directory (calibration-generated.json); a run reuses a cache
    with the same settings, a resumed run refuses one with others.

    The model is pruned block by block (streaming): each block is loaded alone, run dense over the
    calibration windows to collect its linear layers' statistics (input norms, and the Hessian
    (2/n)·Σxxᵀ where the method or --linear-errors needs it), pruned, and run again to give the
    next block its inputs. Embeddings and the head are not pruned. Memory holds one block plus
    the calibration activations; activations beyond --memory-budget are kept in a file in the
    run directory.

    Output: DIR holds the pruned model (config.json, model.safetensors, tokenizer.json, ...) and
    report.json (per linear: sparsity, reconstruction error before/after the weight update
    where measured, seconds). The files are those 'topiary convert' writes: from a Hugging Face
    directory its config.json with only the dtype changed, its tokenizer and generation files
    copied unchanged, and shards of the same names; weights in the source's dtype unless --dtype
    says otherwise (f32 for GGUF and llama2.c sources). The model is written into a temporary
    directory beside DIR and renamed at the end, so an interrupted run leaves nothing under DIR.
    With --eval-text, the dense and the pruned model are evaluated with the protocol of 'topiary
    eval' (the pruned one only with --skip-dense-eval: report.json's perplexity_dense is then
    null).

    Nothing of yours is deleted: DIR may not be '', '.', '..', '/', a symbolic link, the working
    directory, the run directory, the model, the calibration file or another input, nor a
    directory that contains one of them. DIR must be new or empty; --overwrite replaces only a
    directory Topiary wrote: its .topiary-output.json lists the files Topiary put there, and a
    directory holding anything else (or without that file) is refused, naming the entry.

    SparseLLM (--method sparsellm) prunes attention with SparseGPT and each feed-forward network
    jointly through auxiliary variables (docs/methods.md): --alpha, --beta, --gamma weigh the
    penalty terms (defaults 5 for LLaMA, 0.1 for OPT, as the reference), --iterations the outer
    loop (default 4), --targets sequential (the dense block on the pruned-so-far activations, as
    the reference code) or dense (the dense model's activations, as the paper's formula).
    report.json records the objective and the FFN output error per block and iteration.

    BESA (--method besa, --sparsity only) learns how sparse each output row (--besa-granularity
    row, default) or each linear (layer) of a block should be so that the block's output changes
    least: a softmax over sparsities 0, 0.01, ..., 1 per row, rows ranked once by Wanda's score,
    the hard mask in the forward pass and the gradient of the expected mask through a
    hand-written backward pass of the block; loss = per-channel normalised output error plus
    --besa-penalty * ((S - target)/target)^2; Adam (--besa-lr, default 0.05), one step per
    calibration window, --besa-epochs passes (default 1). --targets sequential (default) or dense
    as for SparseLLM. A final common shift of all rows makes each block's sparsity the target.
    --besa-reconstruct then updates the kept weights with SparseGPT under the learned masks.
    report.json records each linear's learned sparsity; besa-sparsity.svg beside it draws them
    (blocks x projections).

    Families: LLaMA-2/3.x, Mistral, Qwen2/2.5, Qwen3, Gemma-2, Phi-3, Mixtral, Qwen3-MoE and OPT. Biases and
    norms stay dense; Phi-3's fused qkv_proj and gate_up_proj are pruned as their q/k/v and
    gate/up parts and written back fused. Mixture of experts (Mixtral, Qwen3-MoE): the router is not
    pruned; each expert's linears are pruned from the calibration tokens routed to it
    (--moe-calibration routed, default) or from every token (all, so that rarely chosen
    experts get data; the block's output still uses the routing); SparseLLM and BESA work per
    expert; report.json gives the tokens each expert saw (expert_tokens). An expert that no
    token reached is pruned with zero statistics (by magnitude order); use all then.

    Distribution: --workers N starts N worker processes on loopback, --hosts uses running
    'topiary worker' processes; the chain of blocks is split into contiguous ranges balanced by
    cost, one per worker, printed before the run and recorded in report.json. With
    --coordination sequential each worker starts from the previous worker's pruned boundary
    activations, so the result equals the single-process run byte for byte. Without either
    option the same coordinator runs one in-process worker. With --coordination admm a dense pass
    through the workers gives every boundary its dense activations; then each round all workers
    prune in parallel from their boundary inputs, and the coordinator moves each boundary to the
    left neighbour's pruned output (--rho infinite, the default) or a blend with the dense target
    and a scaled dual (finite --rho), until every residual is at most --tolerance, or the sum of
    the residuals falls by less than --min-improvement (default 0.05) of the round before's in a
    round whose model is no better than the best before, or --rounds (default: the number of
    workers) are done. After each round the model its weights
    make is run over the calibration windows; the run keeps the round whose model has the smallest
    language-model loss there (--keep-round best, the default; last: the last round). Residuals, errors,
    the kept round and why the rounds stopped go to report.json. Workers
    read the model from its path (--weights path, the default: a shared filesystem, as on HPC
    clusters), or with --weights send receive their range's weights with each assignment (they
    then hold them in memory).

    Run directory (--run-dir, default OUTPUT.run; docs/run-directory.md): run.lock, run.json
    (model fingerprint, options, plan, its own checksum), events.jsonl, each pruned block as it
    finishes with its checksum, boundary activations at worker handoffs. It must be new, empty or
    a run directory: any other directory is refused, and only the files a run writes are ever
    removed from it. One process at a time uses it (flock on run.lock; another is refused naming
    the holder's pid and host). --resume DIR continues an interrupted run with its options and
    writes the same bytes as an undisturbed run, pruning no finished block again; options that
    would change the result cannot change, and an edited run.json is refused. Each checkpoint
    names its run (run.json's checksum) and block: one copied from another block or another run
    is refused (event checkpoint_refused) and redone. A completed run is not run again; if its
    output is gone, --resume says so and exits 1. SIGTERM or SIGINT stops the run with exit code
    75 (resume me). A worker whose connection fails or that sends no heartbeat for
    --heartbeat-timeout seconds is lost; the rest of its range goes to another worker.

    Limits (a mistyped value is refused before any work): --threads 1-4096, --workers and the
    --hosts count 1-1024 and at most the model's blocks, --calib-samples 1-65536, --calib-seqlen
    and --eval-seqlen at most the model's context, --pattern M at most 1024, --blocksize
    1-65536, --iterations, --rounds, --besa-epochs 1-1000, --memory-budget at most 1024T,
    timeouts and intervals at most a week. --sparsity is a fraction: 70 or 70% is refused with
    "did you mean 0.7?".

    Progress: a bar on a terminal; otherwise one JSON line per block on stderr. The ETA counts
    only blocks still to prune (blocks replayed after a resume are not work done).

    --profile measures the machine's sgemm rate (the better of 1024^3 and 2048^3 through Linalg)
    before the run, prints a table of where the pruned blocks' time went on stderr at the end
    (load, dense forward, statistics, solve, pruned forward, error metrics, spill and checkpoint
    I/O, waiting), each phase with its FLOPs counted from the shapes and its ratio to the sgemm
    rate (FLOPs at that rate over the seconds taken), and writes the same per block under
    "profile" in report.json.

    Each linear's errors (mask-only and final, ‖ΔW X‖² / ‖W X‖² on the calibration inputs) are
    quadratic forms in its input Hessian XᵀX, which SparseGPT, SparseLLM and BESA's refit
    (--besa-reconstruct) build anyway. Wanda, magnitude and BESA's learning need only the input
    norms, so they skip the Hessian (a d x d update per token and input group) and these two
    errors unless --linear-errors asks for them; every method reports each block's output error.
    """
    static let options = [
        CommonOptions.model, CommonOptions.tokenizer,
        OptionSpec(name: "method", value: "NAME", help: "magnitude, wanda, sparsegpt, sparsellm or besa"),
        OptionSpec(name: "sparsity", value: "S", help: "fraction of each linear's weights to remove, in (0, 1) (0.7, not 70)"),
        OptionSpec(name: "pattern", value: "N:M", help: "remove N of every M consecutive weights of each row (e.g. 2:4; M at most 1024)"),
        OptionSpec(name: "calib", value: "FILE", help: "calibration text (UTF-8), file of token ids, JSON-lines shard (.jsonl, .jsonl.gz, .json.gz: C4, the Pile), or generate:N[:L] (N sequences of L tokens sampled from the model)"),
        OptionSpec(name: "calib-samples", value: "N", help: "calibration windows, 1-65536 (default 128)"),
        OptionSpec(name: "calib-seqlen", value: "L", help: "tokens per calibration window (default 2048, or the model's context)"),
        OptionSpec(name: "seed", value: "S", help: "seed of the window sampler, or of the token sampler with --calib generate (default 0)"),
        OptionSpec(name: "output", value: "DIR", help: "new or empty directory to write the pruned model to"),
        OptionSpec(name: "overwrite", value: nil, help: "replace an output directory Topiary wrote (never one holding other files)"),
        OptionSpec(name: "layers", value: "A-B", help: "prune only blocks A..B (0-based, inclusive); the others stay dense"),
        OptionSpec(name: "memory-budget", value: "SIZE", help: "activation bytes kept in memory, e.g. 512M, 8G (default: a quarter of RAM)"),
        OptionSpec(name: "run-dir", value: "DIR", help: "new, empty or run directory: run.json, events.jsonl, checkpoints, spilled activations (default: OUTPUT.run)"),
        OptionSpec(name: "resume", value: "DIR", help: "continue the run in DIR with its options (exit code 75 means: resume me)"),
        OptionSpec(name: "weights", value: "HOW", help: "path (default: workers read the model themselves) or send (the coordinator sends each range's weights)"),
        OptionSpec(name: "connect-timeout", value: "S", help: "reach and authenticate each --hosts worker within S seconds (default 60)"),
        OptionSpec(name: "heartbeat-interval", value: "S", help: "seconds between a busy worker's heartbeats (default 5)"),
        OptionSpec(name: "heartbeat-timeout", value: "S", help: "silence after which a worker counts as lost (default 60)"),
        OptionSpec(name: "blocksize", value: "B", help: "SparseGPT lazy-update block width (default 128)"),
        OptionSpec(name: "percdamp", value: "F", help: "SparseGPT dampening, fraction of the mean Hessian diagonal (default 0.01)"),
        OptionSpec(name: "weight-update", value: "HOW", help: "obs (default: SparseGPT's column loop) or admm (mask and weights from ADMM on the layer's least-squares problem, docs/methods.md)"),
        OptionSpec(name: "admm-iterations", value: "K", help: "--weight-update admm: iterations (default 30)"),
        OptionSpec(name: "admm-rho", value: "X", help: "--weight-update admm: first penalty, relative to the mean Hessian diagonal (default 0.1)"),
        OptionSpec(name: "admm-rho-growth", value: "G", help: "--weight-update admm: the penalty's factor every 3 iterations (default 1.5; it stops growing at 10^8)"),
        OptionSpec(name: "alpha", value: "A", help: "SparseLLM: weight of the pre-activation fit terms (default 5 LLaMA, 0.1 OPT)"),
        OptionSpec(name: "beta", value: "B", help: "SparseLLM: weight of the output fit term (default as --alpha)"),
        OptionSpec(name: "gamma", value: "G", help: "SparseLLM: weight of the activation term (default as --alpha)"),
        OptionSpec(name: "iterations", value: "T", help: "SparseLLM: outer iterations (default 4)"),
        OptionSpec(name: "targets", value: "MODE", help: "SparseLLM and BESA: sequential (default) or dense"),
        OptionSpec(name: "allocation", value: "MODE", help: "sparsity per block: uniform (default), owl (outlier-weighted, Yin et al. 2024) or learned (one budget from each block's error-vs-sparsity curve); owl and learned unstructured only"),
        OptionSpec(name: "owl-m", value: "M", help: "OWL: a weight is an outlier above M times its linear's mean Wanda score (default 5)"),
        OptionSpec(name: "owl-lambda", value: "L|auto", help: "OWL: block sparsities within ±L of the target (default 0.08); auto: the λ of least calibration loss among 0, 0.04, ..., 0.2"),
        OptionSpec(name: "learned-blend", value: "T|auto", help: "learned: each block's sparsity T of the way from the target to the curves' solution (0 uniform, 1 the solution); auto (default): the T of least calibration loss among 0, 0.25, 0.5, 0.75, 1"),
        OptionSpec(name: "moe-calibration", value: "MODE", help: "mixture of experts: routed (default; each expert's tokens) or all (every token through every expert)"),
        OptionSpec(name: "dtype", value: "TYPE", help: "output weights: f32, f16 or bf16 (default: a Hugging Face source's own, f32 for GGUF and llama2.c)"),
        OptionSpec(name: "workers", value: "N", help: "start N local worker processes on loopback and spread the blocks over them (at most the blocks)"),
        OptionSpec(name: "hosts", value: "H:P,...", help: "use the workers listening at these addresses ('topiary worker')"),
        OptionSpec(name: "replicas", value: "R", help: "workers that share each stage (default 1): --workers/--hosts K gives K/R stages of R replicas; alone, R replicas in this process"),
        OptionSpec(name: "coordination", value: "MODE", help: "sequential (default; bit-identical to one process) or admm"),
        OptionSpec(name: "rounds", value: "R", help: "ADMM: most rounds (default: the number of workers)"),
        OptionSpec(name: "rho", value: "X", help: "ADMM: weight of the neighbour's output against the dense target (default: infinite)"),
        OptionSpec(name: "tolerance", value: "E", help: "ADMM: stop when every boundary residual is at most E (default 0)"),
        OptionSpec(name: "min-improvement", value: "F", help: "ADMM: stop when the residuals' sum fell by less than F of the round before's and the model got no better (default 0.05; 0: never)"),
        OptionSpec(name: "keep-round", value: "MODE", help: "ADMM: best (default; the round whose model has the smallest loss on the calibration windows) or last"),
        OptionSpec(name: "secret-file", value: "F", help: "shared secret for workers (or TOPIARY_SECRET); --workers makes its own"),
        OptionSpec(name: "eval-text", value: "FILE", help: "evaluate dense and pruned perplexity on this text"),
        OptionSpec(name: "eval-windows", value: "K", help: "evaluation windows (default: all)"),
        OptionSpec(name: "eval-seqlen", value: "L", help: "evaluation window length (default 2048, or the model's context)"),
        OptionSpec(name: "skip-dense-eval", value: nil, help: "with --eval-text: evaluate the pruned model only (the dense perplexity is known)"),
        OptionSpec(name: "profile", value: nil, help: "measure the sgemm rate, print where each phase's time went (stderr), record it in report.json"),
        OptionSpec(name: "linear-errors", value: nil, help: "measure each linear's errors also for wanda, magnitude and besa without --besa-reconstruct (builds the input Hessians)"),
        CommonOptions.device, CommonOptions.precision,
        CommonOptions.threads, CommonOptions.json,
    ] + BESAOptions.specs

    static func run(_ given: ParsedArguments) throws {
        // A resumed run takes its options from run.json; those given now may only change how it
        // runs (workers, threads, ...), not what it computes.
        var args = given
        var resumed: (run: RunDirectory, manifest: RunManifest)?
        if let directory = given.string("resume") {
            let (merged, run, manifest) = try RunSupport.resumedArguments(given, directory: directory)
            args = merged
            resumed = (run, manifest)
            let completions = try run.events.records().compactMap { r -> (output: String, sha256: String)? in
                if case .complete(let output, let sha) = r.event { return (output, sha) } else { return nil }
            }
            if let complete = completions.last {
                let output = args.string("output") ?? complete.output
                // Its checkpoints went when it completed: the output is all there is of it.
                guard (try? OutputDirectory.writtenFiles(output)) != nil else {
                    throw ToolError("the run in \(directory) completed, but its output \(output) is gone or is no longer the directory Topiary wrote; its checkpoints were removed when it completed, so it cannot be rebuilt from them: run the same 'topiary prune' again without --resume (the run directory is reused)")
                }
                print("the run in \(directory) is already complete; its output is \(output) (weights sha256 \(complete.sha256))")
                return
            }
        }
        try CommonOptions.apply(args)
        let started = Date()
        // Options first, so that a mistake is reported before any work.
        guard let methodName = args.string("method") else { throw UsageError(message: "topiary prune: missing required option '--method' (magnitude, wanda, sparsegpt, sparsellm or besa)") }
        guard let method = PruneMethod(rawValue: methodName) else {
            throw UsageError(message: "topiary prune: unknown --method '\(methodName)' (known: \(PruneMethod.allCases.map(\.rawValue).joined(separator: ", ")))")
        }
        let pattern = try parsePattern(sparsity: args.string("sparsity"), pattern: args.string("pattern"))
        let calibPath = try args.required("calib")
        let output = try args.required("output")
        // --calib generate:N[:L]: N sequences sampled from the model itself (SelfCalibration).
        var generateSpec: SelfCalibration.Spec?
        if SelfCalibration.isSpec(calibPath) {
            do { generateSpec = try SelfCalibration.parse(calibPath, maxSamples: Limits.calibSamples) } catch {
                throw UsageError(message: "topiary prune: \(error)")
            }
        }
        let givenSamples = try args.int("calib-samples", in: 1...Limits.calibSamples)
        if let generateSpec, let givenSamples, givenSamples != generateSpec.samples {
            throw UsageError(message: "topiary prune: --calib-samples \(givenSamples) conflicts with --calib \(calibPath), which samples \(generateSpec.samples) sequences; N of generate:N[:L] is the number of calibration windows (drop --calib-samples)")
        }
        let samples = generateSpec?.samples ?? givenSamples ?? 128
        let seed = try args.int("seed") ?? 0
        let layers = try args.string("layers").map(parseLayers)
        // What this process may use (its control group's limit or the machine's memory): the
        // default budget, the check below and report.json's record.
        let memoryLimit = MemoryLimit.current
        let budget = try args.string("memory-budget").map { try parseSize($0) } ?? defaultMemoryBudget(memoryLimit)
        var sparseGPT = SparseGPTPruner.Options()
        if let b = try args.int("blocksize", in: 1...Limits.blocksize) { sparseGPT.blockSize = b }
        if let d = try args.double("percdamp", in: 0...Limits.percdamp) { sparseGPT.percentDamp = d }
        let admmGiven = ["admm-iterations", "admm-rho", "admm-rho-growth"].filter { args.string($0) != nil }
        switch args.string("weight-update") {
        case nil, "obs":
            if let first = admmGiven.first {
                throw UsageError(message: "topiary prune: --\(first) applies to --weight-update admm")
            }
        case "admm":
            var admm = ADMMPruner.Options()
            if let k = try args.int("admm-iterations", in: 1...Limits.iterations) { admm.iterations = k }
            if let r = try args.double("admm-rho", in: 1e-6...1e6) { admm.rho = r }
            if let g = try args.double("admm-rho-growth", in: 1...100) { admm.rhoGrowth = g }
            sparseGPT.admm = admm
        case let other?:
            throw UsageError(message: "topiary prune: --weight-update must be obs or admm, got '\(other)'")
        }
        let requestedDType = try parseDType(args.string("dtype"))
        var targets = TargetMode.sequential
        if let t = args.string("targets") {
            guard let mode = TargetMode(rawValue: t) else {
                throw UsageError(message: "topiary prune: --targets must be sequential or dense, got '\(t)'")
            }
            targets = mode
        }
        let sparseLLMValues = (try args.double("alpha"), try args.double("beta"), try args.double("gamma"),
                               try args.int("iterations", in: 1...Limits.iterations))
        if method != .sparsellm && (sparseLLMValues.0 != nil || sparseLLMValues.1 != nil || sparseLLMValues.2 != nil || sparseLLMValues.3 != nil) {
            throw UsageError(message: "topiary prune: --alpha, --beta, --gamma and --iterations apply to --method sparsellm only")
        }
        if method != .sparsellm && method != .besa && args.string("targets") != nil {
            throw UsageError(message: "topiary prune: --targets applies to --method sparsellm or besa only")
        }
        var expertCalibration: ExpertCalibration?
        let allocationName = args.string("allocation") ?? "uniform"
        guard let allocation = AllocationMethod(rawValue: allocationName) else {
            throw UsageError(message: "topiary prune: --allocation must be \(AllocationMethod.allCases.map(\.rawValue).joined(separator: " or ")), got '\(allocationName)'")
        }
        let owlM = try args.double("owl-m") ?? 5
        // nil: --owl-lambda auto (searched on the calibration loss).
        let owlLambda: Double? = args.string("owl-lambda") == "auto" ? nil : try args.double("owl-lambda") ?? 0.08
        guard owlM.isFinite, owlM > 0 else { throw UsageError(message: "topiary prune: --owl-m must be a positive number, got \(owlM)") }
        if let owlLambda, !(owlLambda.isFinite && owlLambda >= 0 && owlLambda < 1) {
            throw UsageError(message: "topiary prune: --owl-lambda must be in [0, 1) or auto, got \(owlLambda)")
        }
        if allocation != .owl && (args.string("owl-m") != nil || args.string("owl-lambda") != nil) {
            throw UsageError(message: "topiary prune: --owl-m and --owl-lambda apply to --allocation owl")
        }
        // nil: --learned-blend auto (the default; searched on the calibration loss).
        var learnedBlend: Double?
        if let text = args.string("learned-blend"), text != "auto" {
            guard let v = Double(text.trimmingCharacters(in: .whitespaces)), v >= 0, v <= 1 else {
                throw UsageError(message: "topiary prune: --learned-blend must be a number from 0 to 1 or auto, got '\(text)'")
            }
            learnedBlend = v
        }
        if allocation != .learned && args.string("learned-blend") != nil {
            throw UsageError(message: "topiary prune: --learned-blend applies to --allocation learned")
        }
        if allocation != .uniform, case .nOfM = pattern {
            throw UsageError(message: "topiary prune: --allocation \(allocation.rawValue) gives each block its own unstructured sparsity; with --pattern N:M every group keeps N of M, so there is nothing to allocate")
        }
        if let m = args.string("moe-calibration") {
            guard let mode = ExpertCalibration(rawValue: m) else {
                throw UsageError(message: "topiary prune: --moe-calibration must be routed or all, got '\(m)'")
            }
            expertCalibration = mode
        }
        let besa = try BESAOptions.parse(args, method: method)
        if method == .besa, case .nOfM = pattern {
            throw UsageError(message: "topiary prune: --method besa learns unstructured sparsity; give --sparsity, not --pattern")
        }
        // SparseGPT's settings apply where its solver runs: sparsegpt, sparsellm's attention, and
        // BESA's reconstruction.
        let usesSparseGPT = method == .sparsegpt || method == .sparsellm || (besa?.reconstruct ?? false)
        if !usesSparseGPT && (args.string("blocksize") != nil || args.string("percdamp") != nil || args.string("weight-update") != nil) {
            throw UsageError(message: "topiary prune: --blocksize, --percdamp and --weight-update apply to --method sparsegpt, sparsellm, or besa with --besa-reconstruct")
        }
        for (name, v) in [("alpha", sparseLLMValues.0), ("beta", sparseLLMValues.1), ("gamma", sparseLLMValues.2)] {
            if let v, !(v > 0) { throw UsageError(message: "topiary prune: --\(name) must be positive, got \(v)") }
        }
        let evalText = args.string("eval-text")
        let evalWindows = try args.int("eval-windows", in: 1...Limits.windows)
        let json = args.flag("json")
        let skipDenseEval = args.flag("skip-dense-eval")
        if evalText == nil, let given = ["eval-windows", "eval-seqlen", "skip-dense-eval"].first(where: { args.string($0) != nil || args.flag($0) }) {
            throw UsageError(message: "topiary prune: --\(given) goes with --eval-text FILE (the text to evaluate on); without it nothing is evaluated")
        }
        let profiles = args.flag("profile")
        let linearErrors = args.flag("linear-errors")
        let overwrite = args.flag("overwrite")
        let workerCount = try args.int("workers", in: 1...Limits.workers)
        let hostCount = try args.string("hosts").map(checkHosts)
        let replicas = try args.int("replicas", in: 1...Limits.workers) ?? 1
        if workerCount != nil && hostCount != nil { throw UsageError(message: "topiary prune: --workers and --hosts exclude each other") }
        let precision = try CommonOptions.precision(args)
        if precision == .f64 && (workerCount != nil || hostCount != nil || replicas > 1) {
            let given = workerCount != nil ? "--workers" : hostCount != nil ? "--hosts" : "--replicas \(replicas)"
            throw UsageError(message: "topiary prune: --precision f64 runs as one process without replicas (workers and replicas exchange activations and statistics in f32); drop \(given)")
        }
        let connectTimeout = try args.double("connect-timeout", in: 0...Limits.seconds)
        let heartbeatInterval = try args.double("heartbeat-interval", in: 0...Limits.seconds) ?? 5
        let heartbeatTimeout = try args.double("heartbeat-timeout", in: 0...Limits.seconds) ?? 60
        guard heartbeatInterval > 0, heartbeatTimeout > heartbeatInterval else {
            throw UsageError(message: "topiary prune: --heartbeat-timeout (\(heartbeatTimeout)) must be longer than --heartbeat-interval (\(heartbeatInterval)), both positive")
        }
        if let connectTimeout, !(connectTimeout > 0) { throw UsageError(message: "topiary prune: --connect-timeout must be positive, got \(connectTimeout)") }
        let coordinationName = args.string("coordination") ?? "sequential"
        guard let coordination = Coordination(rawValue: coordinationName) else {
            throw UsageError(message: "topiary prune: --coordination must be one of \(Coordination.allCases.map(\.rawValue).joined(separator: ", ")), got '\(coordinationName)'")
        }
        let rounds = try args.int("rounds", in: 1...Limits.rounds)
        let rho = try args.double("rho")
        let tolerance = try args.double("tolerance")
        let minImprovement = try args.double("min-improvement")
        let keepName = args.string("keep-round")
        if coordination != .admm && (rounds != nil || rho != nil || tolerance != nil || minImprovement != nil || keepName != nil) {
            throw UsageError(message: "topiary prune: --rounds, --rho, --tolerance, --min-improvement and --keep-round apply to --coordination admm only")
        }
        if let minImprovement, !(minImprovement >= 0 && minImprovement < 1) {
            throw UsageError(message: "topiary prune: --min-improvement must be at least 0 and below 1, got \(minImprovement)")
        }
        let keepRound = try keepName.map { name in
            guard let k = ADMMKeep(rawValue: name) else {
                throw UsageError(message: "topiary prune: --keep-round must be one of \(ADMMKeep.allCases.map(\.rawValue).joined(separator: ", ")), got '\(name)'")
            }
            return k
        }
        if let rho, !(rho > 0) { throw UsageError(message: "topiary prune: --rho must be positive, got \(rho)") }
        if let tolerance, tolerance < 0 { throw UsageError(message: "topiary prune: --tolerance must not be negative") }
        let weightsMode = args.string("weights") ?? "path"
        guard weightsMode == "path" || weightsMode == "send" else {
            throw UsageError(message: "topiary prune: --weights must be path or send, got '\(weightsMode)'")
        }
        let runDir = args.string("run-dir") ?? OutputDirectory.trimmedPath(output) + ".run"
        if runDir.isEmpty { throw UsageError(message: "topiary prune: --run-dir is empty; give a directory for the run's checkpoints") }
        // Nothing the user owns may be replaced by the output: checked before any work.
        try OutputDirectory.check(output, overwrite: overwrite, command: name, protecting: OutputDirectory.protected([
            ("the run directory", runDir), ("the model", args.string("model")), ("the calibration file", generateSpec == nil ? calibPath : nil),
            ("the tokenizer", args.string("tokenizer")), ("the evaluation text", args.string("eval-text")),
            ("the secret file", args.string("secret-file")),
        ]))
        if resumed == nil { try RunDirectory.checkForNewRun(runDir) }

        let model = try CommonOptions.openModel(args)
        let c = model.config
        // Every linear's weight, for the pattern's checks.
        let linearTensors = (0..<c.layerCount).flatMap { i in
            let names = Set(c.family.linears(c, block: i).map { $0 + ".weight" })
            return c.family.blockTensors(c, block: i).filter { names.contains($0.name) }
        }
        switch pattern {
        case .nOfM(let n, let m):
            // N:M groups M consecutive inputs of each row: a linear whose input width M does not
            // divide would have a short last group (all of it zeroed when shorter than N).
            if let bad = linearTensors.first(where: { $0.cols % m != 0 }) {
                throw UsageError(message: "topiary prune: --pattern \(n):\(m) needs every linear's input width to be a multiple of \(m), and \(bad.name) of \(model.path) has \(bad.cols) inputs")
            }
        case .unstructured(let fraction):
            // A method zeroes the k = int(fraction · n) smallest scores of a unit of n weights and
            // every score tied with the k-th (magnitude: the matrix; SparseGPT: a block of
            // --blocksize columns; Wanda rounds per matrix): a fraction this close to 1 would
            // leave a unit with one weight or none.
            for tensor in linearTensors {
                var unit = tensor.rows * tensor.cols
                if usesSparseGPT {
                    let last = tensor.cols % sparseGPT.blockSize
                    unit = tensor.rows * (last > 0 ? last : min(tensor.cols, sparseGPT.blockSize))
                }
                guard Int(Double(unit) * fraction) < unit - 1 else {
                    let given = args.string("sparsity") ?? String(fraction)
                    throw UsageError(message: "topiary prune: --sparsity \(given) would leave at most one of \(unit) weights in \(tensor.name) of \(model.path)\(usesSparseGPT ? " (a block of its columns, as SparseGPT selects them)" : ""); give a smaller fraction")
                }
            }
        }
        let givenSeqlen = try args.int("calib-seqlen", in: 1...c.maxPositions)
        if let length = generateSpec?.sequenceLength {
            if let givenSeqlen, givenSeqlen != length {
                throw UsageError(message: "topiary prune: --calib-seqlen \(givenSeqlen) conflicts with --calib \(calibPath), whose sequences have \(length) tokens (give L once)")
            }
            guard length <= c.maxPositions else {
                throw UsageError(message: "topiary prune: --calib \(calibPath): L = \(length) tokens is longer than the model's context of \(c.maxPositions) positions (\(model.path))")
            }
        }
        let seqlen = generateSpec?.sequenceLength ?? givenSeqlen ?? min(2048, c.maxPositions)
        if generateSpec != nil && seqlen < 2 {
            throw UsageError(message: "topiary prune: --calib \(calibPath) needs sequences of at least 2 tokens (BOS and one sampled token); --calib-seqlen is \(seqlen)")
        }
        var startToken = 0
        if generateSpec != nil {
            guard let bos = c.bosTokenID ?? model.tokenizer?.bosID, bos >= 0 && bos < c.vocabularySize else {
                throw ToolError("--calib \(calibPath): \(model.path) names no BOS token to start the sampled sequences from")
            }
            startToken = bos
        }
        let evalSeqlen = try args.int("eval-seqlen", in: 2...max(2, c.maxPositions)) ?? min(2048, c.maxPositions)
        if let workerCount, workerCount > c.layerCount {
            throw UsageError(message: "topiary prune: --workers \(workerCount) is more than the model's \(c.layerCount) blocks; each worker prunes a range of at least one block")
        }
        if let hostCount, hostCount > c.layerCount {
            throw UsageError(message: "topiary prune: --hosts names \(hostCount) workers, more than the model's \(c.layerCount) blocks; each worker prunes a range of at least one block")
        }

        // Calibration windows: from a JSON-lines shard (C4, the Pile) as the references' C4
        // loader draws them, or from one text or token-id stream.
        // Sampled sequences (--calib generate) are drawn once the run directory, which caches
        // them, is taken.
        var windows: [[Int]] = []
        var streamTokens: [Int]?   // a text or token-id file's whole stream
        var calibrationSummary: [String: Any] = ["file": calibPath, "seed": seed]
        if generateSpec != nil {
            calibrationSummary = [:]
        } else if let message = DocumentShard.unsupportedCompression(calibPath) {
            throw ToolError(message)
        } else if DocumentShard.isShardName(calibPath) {
            guard let tokenizer = model.tokenizer else {
                throw ToolError("\(calibPath): a JSON-lines shard is text and needs a tokenizer, and \(model.path) has none (pass --tokenizer)")
            }
            // The decompressed shard (C4's first: some 800 MB) lives only while the windows are drawn.
            let drawn = try DocumentWindows.sample(shard: try DocumentShard.read(path: calibPath), samples: samples,
                                                   sequenceLength: seqlen, seed: seed, tokenize: { tokenizer.encode($0, addBOS: nil) })
            windows = drawn.windows
            calibrationSummary["format"] = "jsonl"
            calibrationSummary["documents"] = drawn.documents
            calibrationSummary["draws"] = drawn.draws
        } else {
            guard let calibData = FileManager.default.contents(atPath: calibPath) else {
                throw ToolError("\(calibPath): cannot read calibration file (missing or not readable)")
            }
            let calibTokens: [Int]
            if let ids = try Calibration.tokenIDs(fromFile: calibData, path: calibPath) {
                calibTokens = ids
                calibrationSummary["format"] = "token ids"
            } else {
                guard let tokenizer = model.tokenizer else {
                    throw ToolError("\(calibPath): text calibration needs a tokenizer, and \(model.path) has none (pass --tokenizer, or give token ids)")
                }
                calibTokens = tokenizer.encode(try readUTF8Text(calibPath), addBOS: nil)
                calibrationSummary["format"] = "text"
            }
            do { windows = try Calibration.windows(tokens: calibTokens, samples: samples, sequenceLength: seqlen, seed: seed) } catch {
                throw ToolError("\(calibPath): \(error)")
            }
            calibrationSummary["tokens"] = calibTokens.count
            streamTokens = calibTokens
        }
        if generateSpec == nil {
            calibrationSummary["samples"] = windows.count
            calibrationSummary["seqlen"] = seqlen
        }
        var evalTokens: [Int]?
        if let evalText {
            guard let tokenizer = model.tokenizer else { throw EvaluationError.noTokenizer(path: model.path) }
            evalTokens = tokenizer.encode(try readUTF8Text(evalText), addBOS: nil)
            guard evalSeqlen <= c.maxPositions else {
                throw EvaluationError.windowTooLong(sequenceLength: evalSeqlen, context: c.maxPositions, path: model.path)
            }
        }

        if expertCalibration != nil && c.expertCount == 0 {
            throw UsageError(message: "topiary prune: --moe-calibration applies to mixture-of-experts models; \(model.path) is \(c.architecture.rawValue) without experts")
        }
        if let layers, layers.upperBound >= c.layerCount {
            throw UsageError(message: "topiary prune: --layers \(layers.lowerBound)-\(layers.upperBound) runs past the model's \(c.layerCount) blocks (0-\(c.layerCount - 1))")
        }
        if generateSpec == nil, let bad = (streamTokens ?? Array(windows.joined())).first(where: { $0 < 0 || $0 >= c.vocabularySize }) {
            throw ToolError("\(calibPath): token id \(bad) is outside the model's vocabulary of \(c.vocabularySize)")
        }

        // What the largest block's prune must hold at once, against the memory this process may
        // use (a Slurm job's or container's control group, or the machine): refused here, not
        // killed by the kernel an hour in. Workers on other machines (--hosts) check themselves
        // when their job is assigned.
        let calibrationWindows = generateSpec?.samples ?? windows.count
        let memoryNeed = MemoryCheck.need(c, plan: PrunePlan(method: method, pattern: pattern, targets: targets, expertCalibration: expertCalibration),
                                          samples: calibrationWindows, sequenceLength: seqlen, budget: budget,
                                          backend: ComputeDevices.defaultBackend)
        if hostCount == nil {
            switch MemoryCheck.check(memoryNeed, method: method, samples: calibrationWindows, sequenceLength: seqlen, limit: memoryLimit) {
            case .fits: break
            case .near(let warning): Console.info("warning: " + warning)
            case .refused(let reason): throw ToolError("\(model.path): " + reason)
            }
        }
        // report.json's record of it (for a run killed or slow for memory, what it was told).
        let memoryRecord: [String: Any] = [
            "limit_bytes": memoryLimit.bytes, "limit_source": memoryLimit.source, "budget_bytes": budget,
            "largest_block_at_least_bytes": memoryNeed.total,
        ]

        let run: RunDirectory
        if let resumed {
            run = resumed.run
        } else {
            // New, empty or a run directory only (a finished run's is reused); locked from here on.
            run = try RunDirectory.create(path: runDir)
        }
        // The file whose checksum run.json records: the calibration file, or the generated cache.
        var calibRecord = calibPath
        if let generateSpec {
            let settings = SelfCalibration.Settings(samples: generateSpec.samples, sequenceLength: seqlen, seed: seed, startToken: startToken,
                                                    model: try ModelFingerprint.compute(path: model.path))
            Console.info(String(format: "calibration: sampling %@ of %d tokens from the model (from token %d, temperature %.2f -> %.2f, seed %d), or reusing %@",
                                counted(settings.samples, "sequence"), seqlen, startToken, settings.schedule.initial, settings.schedule.final,
                                seed, SelfCalibration.cacheName))
            let generating = Date()
            let statusLine = Console.stderrIsTerminal
            let loaded = try SelfCalibration.load(model: model, settings: settings, directory: runDir, mustMatch: resumed != nil) { done, total in
                if statusLine { Console.status("\rsampling: \(done)/\(total) tokens   ") }
            }
            if statusLine { Console.endStatus() }
            windows = loaded.windows
            calibRecord = (runDir as NSString).appendingPathComponent(SelfCalibration.cacheName)
            Console.info("calibration: \(loaded.origin == .cached ? "reused" : "sampled") \(counted(windows.count, "sequence")) (\(calibRecord)) in \(formatSeconds(elapsed(since: generating)))")
            calibrationSummary = settings.json
            calibrationSummary["cache"] = calibRecord
            calibrationSummary["origin"] = loaded.origin.rawValue
        }
        if let resumed {
            try RunSupport.checkInputs(resumed.manifest, modelPath: model.path, calibPath: calibRecord, directory: runDir)
        }
        var sparseLLM: SparseLLM.Options?
        if method == .sparsellm {
            var o = c.architecture == .opt ? SparseLLM.Options.opt : SparseLLM.Options.llama
            if let a = sparseLLMValues.0 { o.alpha = a }
            if let b = sparseLLMValues.1 { o.beta = b }
            if let g = sparseLLMValues.2 { o.gamma = g }
            if let t = sparseLLMValues.3 { o.iterations = t }
            sparseLLM = o
        }
        var plan = PrunePlan(method: method, pattern: pattern, sparseGPT: sparseGPT, sparseLLM: sparseLLM, targets: targets, besa: besa,
                             expertCalibration: expertCalibration)
        if linearErrors { plan.linearErrors = true }
        var job = PruneJob(plan: plan, calibration: windows,
                           sequenceLength: seqlen, layers: layers, memoryBudget: budget, workDirectory: runDir)
        // OWL and learned measure on the dense model before pruning; the plan then carries every
        // block's sparsity (to workers too), and run.json the record, which a resumed run reuses.
        var allocationRecord: AllocationRecord?
        if let recorded = resumed?.manifest.allocation {
            guard recorded.method == allocation else {
                throw ToolError("\(runDir)/run.json: the recorded allocation is \(recorded.method.rawValue), the options say \(allocation.rawValue)")
            }
            allocationRecord = recorded
            Console.info("allocation: \(allocation.rawValue), as recorded in run.json")
        } else if allocation != .uniform {
            allocationRecord = try AllocationRecord.measure(allocation, model: model, job: job, owlM: owlM, owlLambda: owlLambda,
                                                            learnedBlend: learnedBlend) { Console.info($0) }
        }
        if let allocationRecord {
            guard allocationRecord.blockSparsity.count == c.layerCount else {
                throw ToolError("\(runDir)/run.json: the recorded allocation has \(allocationRecord.blockSparsity.count) blocks, the model \(c.layerCount)")
            }
            plan.allocation = allocationRecord.blockSparsity
            job.plan = plan
            Console.info("allocation: block sparsity " + allocationRecord.blockSparsity.map { String(format: "%.3f", $0) }.joined(separator: " "))
        }
        let cluster = try WorkerPool.make(args: args, model: model, tokenizerPath: args.string("tokenizer"), replicas: replicas)
        defer { cluster.shutdown() }
        for r in cluster.remotes {
            r.sendsWeights = weightsMode == "send"
            r.heartbeatInterval = heartbeatInterval
            r.connection.timeout = heartbeatTimeout
        }
        var request = PruneRequest(
            model: model, job: job, coordination: coordination, rounds: rounds, rho: rho, tolerance: tolerance,
            minImprovement: minImprovement, keepRound: keepRound,
            workers: cluster.links, workerPIDs: cluster.processes.map(\.processIdentifier), runDirectory: run,
            start: try resumed.map { .resume($0.manifest) }
                ?? .new({
                    var m = try RunSupport.manifest(args: args, modelPath: model.path, calibPath: calibRecord, plan: [])
                    m.allocation = allocationRecord
                    return m
                }()))
        // Workers sent their weights with each assignment would get them once per micro-batch of
        // ADMM's pipelined dense pass: theirs runs one partition after another.
        if weightsMode == "send" { request.denseMicroBatches = 1 }
        var sgemmRate: Double?
        if profiles {
            sgemmRate = SgemmRate.measure(on: ComputeDevices.defaultBackend)
            Console.info(String(format: "profile: sgemm rate %.1f GFLOP/s", sgemmRate! / 1e9) + " (\(ComputeDevices.defaultBackend.name))")
        }
        request.delivery = PruneDelivery(
            output: output, dtype: requestedDType ?? HuggingFaceExport.defaultDType(for: model), overwrite: overwrite,
            evaluation: evalTokens.map { PruneDelivery.Evaluation(tokens: $0, source: evalText ?? "", sequenceLength: evalSeqlen, windows: evalWindows,
                                                                  skipDense: skipDenseEval) },
            sgemmRate: sgemmRate, fields: ["calibration": calibrationSummary, "precision": precision.rawValue,
                                                  "allocation": allocationRecord?.json ?? ["method": allocation.rawValue],
                                                  "memory": memoryRecord], started: started, command: name)
        let pruneRun = try PruneRun(request) { Console.info($0) }
        try pruneRun.prepare()
        let partitions = pruneRun.partitions
        Console.info("plan: " + zip(partitions, cluster.links).map { "blocks \($0.lowerBound)-\($0.upperBound - 1) on \($1.name)" }.joined(separator: "; "))
        Console.info("memory: the largest block holds at least \(MemoryLimit.describe(memoryNeed.total)) at once; --memory-budget \(MemoryLimit.describe(budget)); this process may use \(MemoryLimit.describe(memoryLimit.bytes)) (\(memoryLimit.source))")
        if replicas > 1 {
            // Replicas hold their windows' inputs until each block's statistics chain: say how
            // much, and when it is more than the activations' budget (which does not bound it).
            let held = ReplicaWork.heldInputBytes(config: c, plan: plan, windows: windows.count, sequenceLength: seqlen,
                                                  replicas: replicas, blocks: 0..<c.layerCount)
            Console.info("replicas: each holds about \(MemoryLimit.describe(held)) of its windows' inputs until a block's statistics are made"
                         + (held > budget ? " (more than --memory-budget \(MemoryLimit.describe(budget)), which bounds the activations only: more"
                            + " replicas or fewer calibration tokens hold less)" : " (beside --memory-budget)"))
        }
        if resumed != nil {
            Console.info("resuming \(runDir): \(pruneRun.finishedBlocks.count) of \(c.layerCount) blocks already done")
        }
        let workerPIDs = cluster.processes.map(\.processIdentifier)
        RunSupport.installSignalHandlers(events: run.events, directory: runDir) {
            for pid in workerPIDs { kill(pid, SIGTERM) }
        }

        // The dense evaluation first, apart from the pruning, so that the progress's clock and ETA
        // start with the pruning.
        let perplexityDense = try pruneRun.evaluateDense()
        Console.info("pruning \(model.path): \(method.rawValue) \(patternText(pattern)), \(counted(windows.count, "calibration window")) of \(seqlen) tokens, seed \(seed)")
        // Blocks that are only run forward (finished before a resume, or outside --layers) are
        // not work: the ETA counts the blocks still to prune (ADMM rounds prune every block again).
        let replayed = pruneRun.replayedBlocks
        let progress = Progress(total: c.layerCount, json: !Console.stderrIsTerminal, replayed: replayed)
        let outcome = try pruneRun.execute { event in
            switch event {
            case .log(let message): Console.info(message)
            case .admmStarting(let options):
                Console.info("ADMM: up to \(options.rounds) rounds, rho \(options.rho), tolerance \(options.tolerance), min improvement \(options.minImprovement), keeping the \(options.keep.rawValue) round; a dense pass first")
            case .block(let block, let report): progress.blockDone(block, report: report)
            case .admmRound(let r):
                progress.finish()
                progress.reset()
                Console.info(String(format: "ADMM round %d: boundary residuals %@; output error vs dense %.5f; the model on the calibration windows: error %.5f, loss %.5f", r.round,
                                    r.residuals.map { String(format: "%.3g", $0) }.joined(separator: ", "), r.outputError, r.modelError ?? .nan, r.calibrationLoss ?? .nan))
            case .pruned: break  // `run`'s; `execute` does not send it
            }
        }
        if let o = outcome.admm { Console.info("ADMM: rounds stopped (\(o.stop.rawValue)); keeping round \(o.kept): \(o.keptReason)") }
        progress.finish()
        let result = try pruneRun.deliver(outcome, perplexityDense: perplexityDense)
        let reports = result.outcome.reports
        printSummaryTable(reports)
        if let sgemmRate { Console.info(ProfileReport.table(reports, sgemmRate: sgemmRate, pruneSeconds: result.outcome.pruneSeconds)) }
        var line = String(format: "sparsity %.4f over pruned linears; pruning took %@", result.sparsity, formatSeconds(result.outcome.pruneSeconds))
        if let d = result.perplexityDense, let p = result.perplexity {
            line += String(format: "; perplexity dense %.3f -> pruned %.3f", d, p)
        } else if let p = result.perplexity {
            line += String(format: "; perplexity pruned %.3f", p)
        }
        print(line)
        print("wrote \(output) (weights sha256 \(result.outputSHA256))")
        if json { JSONLine.print(result.summary) }
    }

    /// One line per block. `sparsity` is the block's: zeros over all its pruned linears' weights
    /// (weighted by size, as the summary's), not a mean of the linears' fractions; the errors are
    /// means over the linears.
    static func printSummaryTable(_ reports: [BlockReport]) {
        print("block  sparsity  mask-only err  final err  block out err  seconds")
        for r in reports {
            let sp = PruneReport.blockSparsity(r)
            // Errors not measured (Wanda and magnitude without --linear-errors) print as "-".
            func mean(_ e: KeyPath<LinearReport, Double?>) -> String {
                let v = r.linears.compactMap { $0[keyPath: e] }
                return v.isEmpty ? "-" : String(format: "%.5f", v.reduce(0, +) / Double(v.count))
            }
            func right(_ text: String, _ width: Int) -> String { String(repeating: " ", count: max(0, width - text.count)) + text }
            print(String(format: "%5d  %8.4f  ", r.block, sp) + right(mean(\.errorBefore), 13) + "  " + right(mean(\.errorAfter), 9)
                  + String(format: "  %13.5f  %7.2f", r.outputError, r.seconds))
        }
    }

    /// --sparsity or --pattern, with a hint when the sparsity looks like a percentage.
    static func parsePattern(sparsity: String?, pattern: String?) throws -> SparsityPattern {
        if let s = sparsity, pattern == nil {
            let text = s.trimmingCharacters(in: .whitespaces)
            let percent = text.hasSuffix("%")
            if let v = Double(percent ? String(text.dropLast()) : text), v.isFinite, percent || (v > 1 && v < 100) {
                let fraction = v / 100
                throw UsageError(message: "topiary prune: --sparsity is a fraction strictly between 0 and 1, got \(s); did you mean --sparsity \(ParsedArguments.format(fraction)) (\(ParsedArguments.format(v))%)?")
            }
        }
        if let p = pattern, sparsity == nil {
            let parts = p.split(separator: ":", omittingEmptySubsequences: false)
            // M sizes per-row buffers: a huge one (even past Int) is refused here, naming the bound.
            if parts.count == 2, !parts[1].isEmpty, parts[1].allSatisfy({ $0.isASCII && $0.isNumber }),
               (Int(parts[1]) ?? Int.max) > Limits.patternM {
                throw UsageError(message: "topiary prune: --pattern N:M needs M from 2 to \(Limits.patternM), got \(p)")
            }
        }
        do { return try SparsityPattern.parse(sparsity: sparsity, pattern: pattern) } catch {
            throw UsageError(message: "topiary prune: \(error)")
        }
    }

    /// How the pattern reads in messages: "unstructured 60%", "2:4".
    static func patternText(_ p: SparsityPattern) -> String {
        switch p {
        case .unstructured: return "unstructured \(p)"
        case .nOfM: return "\(p)"
        }
    }

    /// Checks --hosts (HOST:PORT,...) before any work; returns how many workers it names.
    static func checkHosts(_ hosts: String) throws -> Int {
        let entries = hosts.split(separator: ",", omittingEmptySubsequences: false).map { $0.trimmingCharacters(in: .whitespaces) }
        guard !hosts.trimmingCharacters(in: .whitespaces).isEmpty else {
            throw UsageError(message: "topiary prune: --hosts is empty; give the workers as HOST:PORT,HOST:PORT,... (see 'topiary hostlist')")
        }
        if entries.contains(where: \.isEmpty) {
            throw UsageError(message: "topiary prune: --hosts '\(hosts)' has an empty entry; give the workers as HOST:PORT,HOST:PORT,...")
        }
        guard entries.count <= Limits.workers else {
            throw UsageError(message: "topiary prune: --hosts names \(entries.count) workers; at most \(Limits.workers)")
        }
        for e in entries {
            do { _ = try Endpoint(parsing: e) } catch { throw UsageError(message: "topiary prune: --hosts: \(error)") }
        }
        return entries.count
    }

    static func parseLayers(_ s: String) throws -> ClosedRange<Int> {
        let parts = s.split(separator: "-", omittingEmptySubsequences: false)
        if parts.count == 1, let a = Int(parts[0]), a >= 0 { return a...a }
        guard parts.count == 2, let a = Int(parts[0]), let b = Int(parts[1]), a >= 0, b >= a else {
            throw UsageError(message: "topiary prune: --layers expects A-B with 0 <= A <= B (e.g. 0-14), got '\(s)'")
        }
        return a...b
    }

    static func parseSize(_ s: String, command: String = "prune") throws -> Int {
        let units: [Character: Int] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40]
        var text = s.uppercased()
        if text.hasSuffix("B") { text.removeLast() }
        var scale = 1
        if let last = text.last, let u = units[last] { scale = u; text.removeLast() }
        guard let v = Double(text), v >= 0, v.isFinite else {
            throw UsageError(message: "topiary \(command): --memory-budget expects a size such as 512M or 8G, got '\(s)'")
        }
        guard v * Double(scale) <= Double(Limits.memoryBudget) else {
            throw UsageError(message: "topiary \(command): --memory-budget must be at most 1024T, got '\(s)'")
        }
        return Int(v * Double(scale))
    }

    /// A quarter of the memory this process may use: the machine's, or its control group's
    /// limit (a Slurm job's `--mem`).
    static func defaultMemoryBudget(_ memory: MemoryLimit = .current) -> Int {
        let limit = memory.bytes
        return limit > 0 && limit < Int.max ? limit / 4 : 4 << 30
    }
}

/// The --dtype option; nil when it is not given (the output then keeps the source's dtype:
/// HuggingFaceExport.defaultDType).
func parseDType(_ s: String?) throws -> TensorDType? {
    guard let s else { return nil }
    switch s {
    case "f32", "float32": return .f32
    case "f16", "float16": return .f16
    case "bf16", "bfloat16": return .bf16
    case let other: throw UsageError(message: "--dtype must be f32, f16 or bf16, got '\(other)'")
    }
}

/// Block-by-block progress: a bar with elapsed time and ETA on a terminal, JSON lines otherwise.
/// The ETA counts only the blocks still to prune: blocks that are only run forward (`replayed`:
/// finished before a resume, or outside --layers) take a moment and are not work done, so each
/// pruned block's time is measured from the previous block's end, and the ETA is their mean times
/// the pruned blocks still to come.
final class Progress {
    let total: Int
    let json: Bool
    let start = Date()
    var done = 0
    /// Blocks that are replayed, not pruned (cleared by `reset`, for a new ADMM round).
    var replayed: Set<Int>
    private var last = Date()
    private var workSeconds = 0.0
    private var workDone = 0

    init(total: Int, json: Bool, replayed: Set<Int> = []) {
        self.total = total
        self.json = json
        self.replayed = replayed
    }

    /// Seconds still to go, or nil before the first pruned block.
    var eta: Double? {
        let remaining = total - replayed.count - workDone
        if remaining <= 0 { return 0 }
        return workDone > 0 ? workSeconds / Double(workDone) * Double(remaining) : nil
    }

    func blockDone(_ block: Int, report: BlockReport?) {
        done += 1
        let now = Date()
        let isReplay = replayed.contains(block)
        if !isReplay {
            workSeconds += now.timeIntervalSince(last)
            workDone += 1
        }
        last = now
        let elapsedSeconds = elapsed(since: start)
        if json {
            var event: [String: Any] = ["event": "block", "block": block, "done": done, "of": total,
                                        "elapsed": elapsedSeconds, "pruned": report != nil, "replayed": isReplay]
            if let eta { event["eta"] = eta }
            // What this process has used so far (cumulative; a benchmark differences them per block).
            if let rss = ResourceUsage.residentBytes { event["rss_bytes"] = rss }
            if let peak = ResourceUsage.peakResidentBytes { event["peak_rss_bytes"] = peak }
            if let io = ResourceUsage.io {
                event["read_bytes"] = io.read
                event["write_bytes"] = io.write
            }
            let wire = WireTraffic.totals
            event["wire_sent_bytes"] = wire.sent
            event["wire_received_bytes"] = wire.received
            if let r = report {
                event["output_error"] = r.outputError
                event["seconds"] = r.seconds
            }
            if let data = try? JSONSerialization.data(withJSONObject: event, options: [.sortedKeys]) {
                FileHandle.standardError.write(data + Data("\n".utf8))
            }
        } else {
            let width = 30
            let filled = width * done / max(total, 1)
            let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
            Console.status("\r[\(bar)] block \(done)/\(total)  elapsed \(formatSeconds(elapsedSeconds))  eta \(eta.map(formatSeconds) ?? "--")   ")
        }
    }

    func finish() {
        if !json { Console.endStatus() }
    }

    /// Starts counting again (a new ADMM round).
    func reset() {
        done = 0
        replayed = []
        last = Date()
    }
}
