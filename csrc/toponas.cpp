// The Python module toponas_kernels._C. Importing it runs the static registrations of every
// csrc/*.cpp and csrc/cuda/*.cu file: each family declares its kernel ops' schemas once
// (TORCH_LIBRARY_FRAGMENT(toponas, ...)) and registers its CPU and CUDA implementations
// separately, and the ops with their autograd in C++ (*_fused) sit next to their family's
// kernels. Fakes, and the autograd of the Python custom ops, live in Python
// (toponas_kernels/ops/_define.py; docs/OPS.md lists each op's files).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "toponas_kernels compiled kernels (ops are reached through torch.ops.toponas)",
      -1,    // no per-module state
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}
