// OpenBLAS's CBLAS interface plus its extensions (thread count, core name).
// Debian installs the header under an include directory that pkg-config names.
#include <cblas.h>
