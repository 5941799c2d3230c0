// kernels_impl.h — every kernel body, compiled once per path by isa_{scalar,avx2,avx512}.c.
// Each includer sets the target pragma and KFN(name) (the symbol suffix) before including this file.
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "kernels.h"
#include "simd.h"

#include "impl_norm.h"
#include "impl_matvec.h"
#include "impl_matmul.h"
#include "impl_sample.h"
#include "impl_fused.h"
#include "impl_attention.h"
