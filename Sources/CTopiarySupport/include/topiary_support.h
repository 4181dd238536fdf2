#ifndef TOPIARY_SUPPORT_H
#define TOPIARY_SUPPORT_H
#include <stddef.h>
#include <stdint.h>

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) of `length` bytes, continuing from
/// `crc` (0 to start). Uses the SSE4.2 crc32 instruction when the CPU has it, a table otherwise;
/// both give the same value.
uint32_t topiary_crc32c(uint32_t crc, const void *data, size_t length);

/// The table implementation alone (tests compare it with the hardware path).
uint32_t topiary_crc32c_portable(uint32_t crc, const void *data, size_t length);

/// Whether the hardware path is in use (for benchmarks and docs).
int topiary_crc32c_hardware(void);

/// Keeps freed memory in the process instead of handing it back to the kernel after every
/// large free: buffers up to 32 MiB come from the heap (not a fresh mmap), and the heap's top is
/// trimmed only past 64 MiB. A block's forward frees and reallocates the same sizes again and
/// again; without this each one is new pages that the kernel must zero. Returns 1 when glibc
/// took both settings, 0 otherwise (other C libraries).
int topiary_keep_freed_memory(void);

#endif
