/// The CUDA C++ source of `CUDABackend`'s own kernels, compiled at run time by NVRTC for the
/// device found (PTX for its compute capability, loaded by the driver). Written from the
/// definitions in `ComputeBackend`; `--fmad=false` keeps each product rounded before its sum,
/// as the CPU kernels round them. Reductions have one fixed order per launch shape, so a run
/// repeated on the same device gives the same bits.
enum CUDAKernelSource {
    /// Threads per block for the element-wise kernels and the row reductions.
    static let threads = 256

    static let text = #"""
typedef long long i64;
#define LOOP(i, n) for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)

// Sum of v over the block's 256 threads, in a fixed tree; every thread gets the total.
__device__ float block_sum(float v, float* shared) {
    shared[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
        __syncthreads();
    }
    float total = shared[0];
    __syncthreads();
    return total;
}

__device__ float block_max(float v, float* shared) {
    shared[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) shared[threadIdx.x] = fmaxf(shared[threadIdx.x], shared[threadIdx.x + s]);
        __syncthreads();
    }
    float total = shared[0];
    __syncthreads();
    return total;
}

__device__ float silu_f(float x) { return x / (1.0f + expf(-x)); }
__device__ float gelu_tanh_f(float x) {
    const float c = 0.7978845608028654f;
    return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
}

extern "C" {

__global__ void copy2d(float* dst, i64 dld, const float* src, i64 sld, i64 rows, i64 cols) {
    LOOP(i, rows * cols) { i64 r = i / cols, c = i % cols; dst[r * dld + c] = src[r * sld + c]; }
}

__global__ void scale(float* x, i64 n, float f) { LOOP(i, n) x[i] *= f; }

__global__ void scale_add(float* y, float beta, const float* x, float alpha, i64 n) {
    LOOP(i, n) { float a = y[i] * beta; float b = x[i] * alpha; y[i] = a + b; }
}

__global__ void axpy(float alpha, const float* x, float* y, i64 n) { LOOP(i, n) { float p = alpha * x[i]; y[i] += p; } }

__global__ void map(const float* x, float* y, i64 n, int op) {
    LOOP(i, n) {
        float v = x[i];
        switch (op) {
        case 0: y[i] = fabsf(v); break;
        case 1: y[i] = v * v; break;
        case 2: y[i] = sqrtf(v); break;
        case 3: y[i] = -v; break;
        case 4: y[i] = fmaxf(v, 0.0f); break;
        case 5: y[i] = silu_f(v); break;
        default: y[i] = (v != 0.0f) ? 1.0f : 0.0f; break;
        }
    }
}

__global__ void column_op(const float* x, const float* v, float* y, i64 rows, i64 cols, int op) {
    LOOP(i, rows * cols) {
        i64 c = i % cols;
        y[i] = op == 0 ? x[i] * v[c] : (op == 1 ? x[i] / v[c] : x[i] + v[c]);
    }
}

__global__ void add(const float* x, float* y, i64 n) { LOOP(i, n) y[i] += x[i]; }
__global__ void multiply(const float* a, const float* b, float* c, i64 n) { LOOP(i, n) c[i] = a[i] * b[i]; }
__global__ void add_diagonal(float* a, i64 n, float value) { LOOP(i, n) a[i * n + i] += value; }
__global__ void diagonal(const float* a, float* out, i64 n) { LOOP(i, n) out[i] = a[i * n + i]; }
__global__ void zero_masked(float* x, const float* mask, i64 n) { LOOP(i, n) if (mask[i] != 0.0f) x[i] = 0.0f; }
__global__ void relu_backward(float* d, const float* input, i64 n) { LOOP(i, n) if (!(input[i] > 0.0f)) d[i] = 0.0f; }
__global__ void softcap(float* x, i64 n, float cap) { LOOP(i, n) x[i] = cap * tanhf(x[i] / cap); }

__global__ void mirror_upper(float* c, i64 n) {
    LOOP(i, n * n) { i64 r = i / n, col = i % n; if (r > col) c[i] = c[col * n + r]; }
}

__global__ void transpose(const float* x, float* y, i64 rows, i64 cols) {
    LOOP(i, rows * cols) { i64 r = i / cols, c = i % cols; y[c * rows + r] = x[i]; }
}

// One thread per column, rows added in order.
__global__ void column_squared_sums(const float* x, float* out, i64 rows, i64 cols) {
    LOOP(c, cols) {
        float s = 0.0f;
        for (i64 r = 0; r < rows; r++) { float v = x[r * cols + c]; s += v * v; }
        out[c] = s;
    }
}

__global__ void gated(const float* g, const float* u, float* y, i64 n, int act) {
    LOOP(i, n) {
        float a = act == 0 ? silu_f(g[i]) : (act == 1 ? gelu_tanh_f(g[i]) : fmaxf(g[i], 0.0f));
        y[i] = a * u[i];
    }
}

// One block of 256 threads per row.
__global__ void rms_norm(const float* x, const float* w, float* y, i64 rows, i64 cols, float eps) {
    __shared__ float shared[256];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* xr = x + r * cols;
        float s = 0.0f;
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) s += xr[c] * xr[c];
        float total = block_sum(s, shared);
        float rstd = 1.0f / sqrtf(total / (float)cols + eps);
        for (i64 c = threadIdx.x; c < cols; c += blockDim.x) y[r * cols + c] = (xr[c] * rstd) * w[c];
    }
}

// One thread per (row, head, pair); row r sits at position r mod seq.
__global__ void rope(float* x, const float* cosT, const float* sinT, i64 rows, int heads, int headDim, int half, int seq, int adjacent) {
    LOOP(i, rows * heads * half) {
        i64 r = i / ((i64)heads * half);
        int rest = (int)(i % ((i64)heads * half));
        int h = rest / half, p = rest % half;
        int pos = (int)(r % seq);
        float c = cosT[(i64)pos * half + p], s = sinT[(i64)pos * half + p];
        float* v = x + r * (i64)heads * headDim + (i64)h * headDim;
        int ia = adjacent ? 2 * p : p, ib = adjacent ? 2 * p + 1 : p + half;
        float a = v[ia], b = v[ib];
        if (adjacent) { v[ia] = a * c - b * s; v[ib] = a * s + b * c; }
        else { v[ia] = a * c - b * s; v[ib] = b * c + a * s; }
    }
}

// Causal softmax over rows of scores [rows x seq] (row r is query position r mod seq), in place:
// scores already scaled; capped as cap·tanh(s/cap) when cap > 0; keys before the window and
// after the query set to 0. One block per row.
__global__ void causal_softmax(float* p, i64 rows, int seq, int window, float cap) {
    __shared__ float shared[256];
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        float* row = p + r * seq;
        int i = (int)(r % seq);
        int visible = i + 1;
        int first = window > 0 ? max(0, i - window + 1) : 0;
        float m = __int_as_float(0xff800000);
        for (int j = first + threadIdx.x; j < visible; j += blockDim.x) {
            float v = row[j];
            if (cap > 0.0f) { v = cap * tanhf(v / cap); row[j] = v; }
            m = fmaxf(m, v);
        }
        m = block_max(m, shared);
        float s = 0.0f;
        for (int j = first + threadIdx.x; j < visible; j += blockDim.x) { float e = expf(row[j] - m); row[j] = e; s += e; }
        float total = block_sum(s, shared);
        float inv = 1.0f / total;
        for (int j = threadIdx.x; j < seq; j += blockDim.x) row[j] = (j >= first && j < visible) ? row[j] * inv : 0.0f;
    }
}

// Σ over fixed chunks of `chunk` elements, one thread per chunk, each chunk in index order in
// double (mode 0: a·b; 1: (a − b)²; 2: (a − b·c)², the difference in float): the CPU's chunking.
__global__ void chunked_sums(const float* a, const float* b, const float* c, i64 n, i64 chunk, int mode, double* out) {
    LOOP(t, (n + chunk - 1) / chunk) {
        i64 lo = t * chunk, hi = lo + chunk < n ? lo + chunk : n;
        double s = 0.0;
        for (i64 i = lo; i < hi; i++) {
            if (mode == 0) { s += (double)a[i] * (double)b[i]; }
            else if (mode == 1) { double d = (double)(a[i] - b[i]); s += d * d; }
            else { float p = b[i] * c[i]; double d = (double)(a[i] - p); s += d * d; }
        }
        out[t] = s;
    }
}

__global__ void flag_nonfinite(const float* x, i64 n, unsigned int* flag) {
    LOOP(i, n) { float v = x[i]; if (!(v - v == 0.0f)) *flag = 1u; }
}

// Zeroes the strict lower (lower = 1) or strict upper triangle of a row-major n x n matrix.
__global__ void zero_triangle(float* c, i64 n, int lower) {
    LOOP(i, n * n) { i64 r = i / n, col = i % n; if (lower ? r > col : r < col) c[i] = 0.0f; }
}

// SparseGPT's column loop on one block of `count` <= 256 columns, one thread per row, the row in
// local memory: CPUBackend.sparseGPTRow's arithmetic in its order. m > 0: n:m groups chosen from
// the updated weights at each group's first column (ties to the lower column).
__global__ void sparse_gpt_block(float* w, const float* u, float* mask, float* err, float* losses,
                                 int rows, int count, int n, int m) {
    LOOP(r, rows) {
        float row[256];
        float* wr = w + r * count;
        float* mr = mask + r * count;
        float* er = err + r * count;
        for (int j = 0; j < count; j++) row[j] = wr[j];
        float loss = 0.0f;
        for (int i = 0; i < count; i++) {
            float d = u[(i64)i * count + i];
            if (m > 0 && i % m == 0) {
                int width = min(m, count - i);
                for (int a = 0; a < width; a++) {
                    float da = u[(i64)(i + a) * count + i + a];
                    float sa = row[i + a] * row[i + a] / (da * da);
                    int rank = 0;
                    for (int b = 0; b < width; b++) {
                        float db = u[(i64)(i + b) * count + i + b];
                        float sb = row[i + b] * row[i + b] / (db * db);
                        if (sb < sa || (sb == sa && b < a)) rank++;
                    }
                    if (rank < n) mr[i + a] = 1.0f;
                }
            }
            float v = row[i];
            float q = mr[i] != 0.0f ? 0.0f : v;
            float e = (v - q) / d;
            loss += (v - q) * (v - q) / (d * d);
            er[i] = e;
            row[i] = q;
            if (e != 0.0f) {
                const float* ui = u + (i64)i * count;
                for (int j = i + 1; j < count; j++) row[j] = row[j] + (-e) * ui[j];
            }
        }
        for (int j = 0; j < count; j++) wr[j] = row[j];
        losses[r] = loss;
    }
}

}
"""#

    /// Every kernel the module must hold (looked up once at start-up).
    static let names = ["copy2d", "scale", "scale_add", "axpy", "map", "column_op", "add", "multiply", "add_diagonal",
                        "diagonal", "zero_masked", "relu_backward", "softcap", "mirror_upper", "transpose",
                        "column_squared_sums", "gated", "rms_norm", "rope", "causal_softmax", "chunked_sums", "flag_nonfinite",
                        "zero_triangle", "sparse_gpt_block"]

    /// The widest block `sparse_gpt_block` takes (its row lives in a local array of this size).
    static let sparseGPTMaxColumns = 256
}
