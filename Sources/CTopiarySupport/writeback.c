#define _GNU_SOURCE
#include "topiary_support.h"
#include <fcntl.h>

#if defined(__linux__)
int topiary_writeback_start(int fd, long long offset, long long length) {
    return sync_file_range(fd, (off_t)offset, (off_t)length, SYNC_FILE_RANGE_WRITE);
}

int topiary_writeback_finish(int fd, long long offset, long long length) {
    int r = sync_file_range(fd, (off_t)offset, (off_t)length,
                            SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER);
    if (r == 0) posix_fadvise(fd, (off_t)offset, (off_t)length, POSIX_FADV_DONTNEED);
    return r;
}
#else
int topiary_writeback_start(int fd, long long offset, long long length) { (void)fd; (void)offset; (void)length; return -1; }
int topiary_writeback_finish(int fd, long long offset, long long length) { (void)fd; (void)offset; (void)length; return -1; }
#endif
