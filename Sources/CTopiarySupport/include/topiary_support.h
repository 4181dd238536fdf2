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

/// Sets glibc's malloc for this program's pattern: allocations from 1 MiB up get their own
/// mapping, at a fixed threshold (glibc otherwise raises the threshold after the first such
/// free and serves them from a heap that grows by fragmentation block after block); the heap's
/// top is trimmed past 64 MiB. Matrix storage of 128 KiB and up does not use malloc at all
/// (TopiaryTensor's MappedBuffers keeps recently freed mappings for reuse). Returns 1 when
/// glibc took both settings, 0 otherwise (other C libraries).
int topiary_configure_malloc(void);

/// Starts the disk writes of bytes [offset, offset + length) of an open file without waiting
/// for them (Linux's sync_file_range). Returns 0, or -1 where the system or file system cannot.
int topiary_writeback_start(int fd, long long offset, long long length);

/// Waits until bytes [offset, offset + length) are written to disk (data only: the file's final
/// fsync is still what makes it durable), then tells the kernel that their cached pages will
/// not be read again (POSIX_FADV_DONTNEED). Returns 0, or -1 where the system cannot.
int topiary_writeback_finish(int fd, long long offset, long long length);

#endif
