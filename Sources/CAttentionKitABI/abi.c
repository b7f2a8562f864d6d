// Compile-time checks of the C ABI's layout: the Swift implementation (AttentionKitC) and every
// binding (python/attentionkit/_abi.py) rely on these sizes and offsets. Changing one is an ABI
// break: bump ATTENTIONKIT_ABI_VERSION and the bindings with it.
#include "attentionkit.h"

#include <stddef.h>

_Static_assert(sizeof(attentionkit_tensor) == 80, "attentionkit_tensor layout");
_Static_assert(offsetof(attentionkit_tensor, shape) == 16, "attentionkit_tensor.shape");
_Static_assert(offsetof(attentionkit_tensor, strides) == 48, "attentionkit_tensor.strides");
_Static_assert(sizeof(attentionkit_options) == 40, "attentionkit_options layout");
_Static_assert(offsetof(attentionkit_options, window_left) == 8, "attentionkit_options.window_left");
_Static_assert(offsetof(attentionkit_options, scale) == 24, "attentionkit_options.scale");
_Static_assert(offsetof(attentionkit_options, mask) == 32, "attentionkit_options.mask");
_Static_assert(sizeof(attentionkit_context_options) == 40, "attentionkit_context_options layout");
_Static_assert(sizeof(attentionkit_sequences) == 56, "attentionkit_sequences layout");
