// One pass over the gradient tensors of a torch optimizer step: the checks and data addresses
// the fused kernel needs, read with torch's own C++ accessors. The same reads from Python cost
// ~0.4 us per tensor (shape, dtype, contiguity, device, data_ptr), which dominates a step over
// thousands of small tensors; here they cost a few cache misses each.
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>

// scan(tensors: list, ref: Tensor, ndim: int, dims: int, out: int) -> int
//
// ndim, dims and out are addresses of int64 arrays: ndim[i] is the rank tensor i must have
// and dims holds every expected shape back to back. Returns -1 when each tensor i is a plain
// (exact type) dense, contiguous CPU tensor of ref's dtype with its expected shape, and no
// lazy negation or conjugation; out[i] is then its data address. Otherwise returns the index
// of the first tensor that is not, and the caller falls back to its per-key checks (which
// name the fault or make a contiguous copy).
static PyObject* scan(PyObject*, PyObject* args) {
  PyObject* tensors;
  PyObject* ref;
  unsigned long long ndim_addr, dims_addr, out_addr;
  if (!PyArg_ParseTuple(args, "O!OKKK", &PyList_Type, &tensors, &ref, &ndim_addr, &dims_addr,
                        &out_addr)) {
    return nullptr;
  }
  auto* cls = reinterpret_cast<PyTypeObject*>(THPVariableClass);
  if (Py_TYPE(ref) != cls) {
    PyErr_SetString(PyExc_TypeError, "scan: ref must be a torch.Tensor");
    return nullptr;
  }
  const auto dtype = THPVariable_Unpack(ref).scalar_type();
  const auto* ndim = reinterpret_cast<const int64_t*>(ndim_addr);
  const auto* dims = reinterpret_cast<const int64_t*>(dims_addr);
  auto* out = reinterpret_cast<int64_t*>(out_addr);
  const Py_ssize_t n = PyList_GET_SIZE(tensors);
  Py_ssize_t i = 0;
  try {
    for (; i < n; ++i) {
      PyObject* obj = PyList_GET_ITEM(tensors, i);
      if (Py_TYPE(obj) != cls) break;  // subclasses (and non-tensors) take the checked path
      const at::Tensor& t = THPVariable_Unpack(obj);
      if (t.layout() != at::kStrided || !t.device().is_cpu() || t.scalar_type() != dtype ||
          t.is_neg() || t.is_conj() || t.dim() != ndim[i]) {
        break;
      }
      const auto sizes = t.sizes();
      bool same = true;
      for (int64_t d = 0; d < ndim[i]; ++d) same &= sizes[d] == dims[d];
      if (!same || !t.is_contiguous()) break;
      dims += ndim[i];
      out[i] = reinterpret_cast<int64_t>(t.const_data_ptr());
    }
  } catch (...) {  // e.g. a tensor without storage: let the checked path report it
  }
  return PyLong_FromSsize_t(i == n ? -1 : i);
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, "Checks and data addresses of a list of CPU tensors."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef module = {PyModuleDef_HEAD_INIT, MODULE_NAME_STR, nullptr, -1, methods};

#define MITHRIL_CAT(a, b) a##b
#define MITHRIL_INIT(name) MITHRIL_CAT(PyInit_, name)
PyMODINIT_FUNC MITHRIL_INIT(MODULE_NAME)() { return PyModule_Create(&module); }
