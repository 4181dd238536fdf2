#include "topiary_support.h"

#if defined(__GLIBC__)
#include <malloc.h>

int topiary_configure_malloc(void) {
    int a = mallopt(M_MMAP_THRESHOLD, 1024 * 1024);
    int b = mallopt(M_TRIM_THRESHOLD, 64 * 1024 * 1024);
    return a == 1 && b == 1;
}
#else
int topiary_configure_malloc(void) { return 0; }
#endif
