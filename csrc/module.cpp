// The Python module rapkern._C: empty. Importing it loads this shared library, whose static initializers
// (TORCH_LIBRARY in ops.cpp, TORCH_LIBRARY_IMPL in autograd.cpp and cpu/*.cpp) register the ops with the
// dispatcher; Python then calls them as torch.ops.rapkern.*. (As in pytorch/extension-cpp: no pybind11.)
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
