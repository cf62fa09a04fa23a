// The Python module rapkern._C_cuda: empty. Importing it loads this shared library, whose static initializers
// (TORCH_LIBRARY_IMPL(rapkern, CUDA, m) in attention_fwd_host.cpp) register the CUDA kernels against the schemas
// of rapkern._C (csrc/ops.cpp). A separate module so that a failed CUDA build never takes the CPU kernels down.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
