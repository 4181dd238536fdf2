// CRC-32C for the wire protocol's frame checksums. The hardware instruction checksums at
// memory speed; the table fallback keeps the result identical on CPUs without SSE4.2.
#include "topiary_support.h"
#include <string.h>

static uint32_t table[8][256];
static int table_ready = 0;

static void build_table(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = table[0][n];
        for (int k = 1; k < 8; k++) {
            c = table[0][c & 0xFF] ^ (c >> 8);
            table[k][n] = c;
        }
    }
    table_ready = 1;
}

static uint32_t crc32c_table(uint32_t crc, const unsigned char *p, size_t n) {
    if (!table_ready) build_table();
    crc = ~crc;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        v ^= crc;
        crc = table[7][v & 0xFF] ^ table[6][(v >> 8) & 0xFF] ^ table[5][(v >> 16) & 0xFF] ^ table[4][(v >> 24) & 0xFF] ^
              table[3][(v >> 32) & 0xFF] ^ table[2][(v >> 40) & 0xFF] ^ table[1][(v >> 48) & 0xFF] ^ table[0][v >> 56];
        p += 8;
        n -= 8;
    }
    while (n--) crc = table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

// Three independent chains hide the crc32 instruction's latency (one result every 3 cycles per
// chain, one instruction per cycle). The buffer is cut into lanes of LANE bytes; lanes 2 and 3
// start from a zero state, and the results are joined with the linear "append LANE zero bytes"
// operator Z: crc(A || B) = Z_|B|(crc(A)) ^ crc_from_zero(B), because the register update is
// linear over GF(2). Z is a 32x32 bit matrix, applied through four 256-entry tables.
#define LANE 8192

static uint32_t shift_table[4][256];
static int shift_ready = 0;

// Applies the 32x32 GF(2) matrix `m` (column i = image of bit i) to `v`.
static uint32_t gf2_apply(const uint32_t m[32], uint32_t v) {
    uint32_t r = 0;
    for (int i = 0; v; i++, v >>= 1) if (v & 1) r ^= m[i];
    return r;
}

static void build_shift_table(void) {
    // One zero bit: c -> (c >> 1) ^ (c & 1 ? P : 0).
    uint32_t op[32], sq[32];
    op[0] = 0x82F63B78u;
    for (int i = 1; i < 32; i++) op[i] = 1u << (i - 1);
    // Square three times: the operator for 8 zero bits (one byte).
    for (int k = 0; k < 3; k++) {
        for (int i = 0; i < 32; i++) sq[i] = gf2_apply(op, op[i]);
        memcpy(op, sq, sizeof op);
    }
    // LANE = 2^13 bytes: square 13 more times.
    for (int k = 0; k < 13; k++) {
        for (int i = 0; i < 32; i++) sq[i] = gf2_apply(op, op[i]);
        memcpy(op, sq, sizeof op);
    }
    for (int byte = 0; byte < 4; byte++)
        for (uint32_t b = 0; b < 256; b++) shift_table[byte][b] = gf2_apply(op, b << (8 * byte));
    shift_ready = 1;
}

static inline uint32_t shift_lane(uint32_t c) {
    return shift_table[0][c & 0xFF] ^ shift_table[1][(c >> 8) & 0xFF] ^ shift_table[2][(c >> 16) & 0xFF] ^ shift_table[3][c >> 24];
}

#if defined(__x86_64__)
__attribute__((target("sse4.2")))
static uint32_t crc32c_hardware(uint32_t crc, const unsigned char *p, size_t n) {
    if (!shift_ready) build_shift_table();
    uint64_t c = (uint32_t)~crc;
    while (n >= 3 * LANE) {
        uint64_t c1 = 0, c2 = 0;
        for (size_t i = 0; i < LANE; i += 8) {
            uint64_t v0, v1, v2;
            memcpy(&v0, p + i, 8);
            memcpy(&v1, p + LANE + i, 8);
            memcpy(&v2, p + 2 * LANE + i, 8);
            c = __builtin_ia32_crc32di(c, v0);
            c1 = __builtin_ia32_crc32di(c1, v1);
            c2 = __builtin_ia32_crc32di(c2, v2);
        }
        c = shift_lane((uint32_t)c) ^ (uint32_t)c1;
        c = shift_lane((uint32_t)c) ^ (uint32_t)c2;
        p += 3 * LANE;
        n -= 3 * LANE;
    }
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--) c32 = __builtin_ia32_crc32qi(c32, *p++);
    return ~c32;
}
#endif

uint32_t topiary_crc32c_portable(uint32_t crc, const void *data, size_t length) {
    return crc32c_table(crc, (const unsigned char *)data, length);
}

int topiary_crc32c_hardware(void) {
#if defined(__x86_64__)
    return __builtin_cpu_supports("sse4.2") ? 1 : 0;
#else
    return 0;
#endif
}

uint32_t topiary_crc32c(uint32_t crc, const void *data, size_t length) {
#if defined(__x86_64__)
    if (topiary_crc32c_hardware()) return crc32c_hardware(crc, (const unsigned char *)data, length);
#endif
    return crc32c_table(crc, (const unsigned char *)data, length);
}
