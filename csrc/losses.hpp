// Torch-free CPU loss kernels (fused P-KL and H-KL loss + gradient over chunks of logit rows); see losses.cpp.
#pragma once

#include <pybind11/pybind11.h>

namespace xt {

// Registers pkl_rows, hkl_rows and teacher_topk_columns on the extension module.
void bind_losses(pybind11::module_& m);

}  // namespace xt
