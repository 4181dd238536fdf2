// zlib, as Debian installs it (zlib1g-dev provides zlib.h and libz.so):
// inflate for gzip-compressed calibration shards (C4's *.json.gz).
#include <zlib.h>
