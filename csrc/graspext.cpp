// Python module stub: importing graspext._C loads this library, whose static initializers register the
// graspext::* operators with the dispatcher. Operators are reached through torch.ops.graspext.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      nullptr,  // doc
      -1,  // size
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}
}
