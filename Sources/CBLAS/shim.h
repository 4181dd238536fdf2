// OpenBLAS (cblas) and LAPACKE, as Debian installs them
// (libopenblas-dev provides cblas.h; liblapacke-dev provides lapacke.h).
#include <cblas.h>
#include <lapacke.h>
