/*
 * symbn's compiled entry point: a CPython extension that calls a generated C kernel on NumPy
 * arrays with none of the Python around a ctypes call (symbn.entry builds and loads it).
 *
 * It takes the common call and nothing else: every array a plain C-contiguous ndarray of the
 * dtype and shape the kernel's table says, eps a positive finite float, `out` None or arrays
 * that overlap nothing, no optional input left None, the kernel finishing with SYMBN_OK. For
 * anything else it returns None, and the Python path (the generated _runtime's Kernels._call)
 * takes the call and gives its checks and its errors: the rules are stated once, there, and
 * this file only recognizes calls that pass them. What a call must look like comes from a plan
 * the Python side makes once per kernel, dtype and shape (symbn.entry.Plan):
 *
 *   (address, inputs, reals, outputs, pointers, sizes, schedule)
 *   address   the kernel's packed function (symbn_<norm>_<kernel>_<f32|f64>_packed)
 *   inputs    per input array: (index into the call's values, format "f" or "d", shape, nonnegative,
 *             optional: None stands for the kernel's default, passed as NULL)
 *   reals     per scalar: its index into the values
 *   outputs   per output: (kind, format, shape, make, finish): kind 0 an element output (from
 *             `out` or make()), 1 a buffer the kernel fills (make()); finish(buffer) or None is
 *             what the call returns for it
 *   pointers  the packed function's arrays in order: j >= 0 input j, j < 0 output -j - 1
 *   sizes     the five sizes of x's view
 *   schedule  the loop shape (0: the kernel chooses)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stddef.h>
#include <string.h>

#define SYMBN_MOST_ARRAYS 32

typedef int (*symbn_packed)(void *const *arrays, const ptrdiff_t *sizes, const double *reals, int schedule);

static PyObject *ndarray; /* numpy.ndarray, set by bind() */

/* Whether `view` holds a C-contiguous array of `format` ("f" or "d") with exactly `shape`. */
static int matches(const Py_buffer *view, const char *format, PyObject *shape)
{
    if (!view->format || strcmp(view->format, format) != 0 || !PyTuple_Check(shape) || view->ndim != PyTuple_GET_SIZE(shape))
        return 0;
    for (Py_ssize_t d = 0; d < view->ndim; ++d)
        if (view->shape[d] != PyLong_AsSsize_t(PyTuple_GET_ITEM(shape, d))) return 0;
    return !PyErr_Occurred();
}

/* A buffer of `value` if it is a plain ndarray of `format` and `shape` (writable when asked), else 0. */
static int take(PyObject *value, const char *format, PyObject *shape, int writable, Py_buffer *view)
{
    if (!ndarray || Py_TYPE(value) != (PyTypeObject *)ndarray) return 0;
    if (PyObject_GetBuffer(value, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) != 0) {
        PyErr_Clear();
        return 0;
    }
    if (!matches(view, format, shape)) {
        PyErr_Clear();
        PyBuffer_Release(view);
        return 0;
    }
    return 1;
}

static int overlap(const Py_buffer *a, const Py_buffer *b)
{
    const char *a0 = a->buf, *b0 = b->buf;
    return a0 < b0 + b->len && b0 < a0 + a->len;
}

static int nonnegative(const Py_buffer *view)
{
    const double *v = view->buf;
    for (Py_ssize_t i = 0; i < view->len / (Py_ssize_t)sizeof(double); ++i)
        if (v[i] < 0.0) return 0;
    return 1;
}

/* call(plan, values, out): the kernel's results, or None where the call is not the common one. */
static PyObject *call(PyObject *self, PyObject *args)
{
    PyObject *plan, *values, *out;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!O!O", &PyTuple_Type, &plan, &PyTuple_Type, &values, &out)) return NULL;
    PyObject *address, *inputs, *reals, *outputs, *pointers, *sizes;
    int schedule;
    if (!PyArg_ParseTuple(plan, "OO!O!O!O!O!i", &address, &PyTuple_Type, &inputs, &PyTuple_Type, &reals, &PyTuple_Type, &outputs,
                          &PyTuple_Type, &pointers, &PyTuple_Type, &sizes, &schedule)) return NULL;
    const Py_ssize_t ni = PyTuple_GET_SIZE(inputs), no = PyTuple_GET_SIZE(outputs), nr = PyTuple_GET_SIZE(reals);
    if (ni + no > SYMBN_MOST_ARRAYS || nr > 4 || PyTuple_GET_SIZE(sizes) != 5 || PyTuple_GET_SIZE(pointers) > SYMBN_MOST_ARRAYS) {
        PyErr_SetString(PyExc_ValueError, "symbn entry: a plan beyond this entry point's limits");
        return NULL;
    }
    Py_buffer views[SYMBN_MOST_ARRAYS];
    char absent[SYMBN_MOST_ARRAYS] = {0}; /* inputs left out (None, optional): no buffer, a NULL pointer */
    PyObject *buffers[SYMBN_MOST_ARRAYS] = {NULL};
    Py_ssize_t held = 0, made = 0;
    PyObject *result = Py_None;
    double real[4];
    ptrdiff_t size[5];

    /* the stores given in `out`: None, one array (one store), or a tuple or list of one per store */
    Py_ssize_t stores = 0;
    for (Py_ssize_t j = 0; j < no; ++j) stores += PyLong_AsLong(PyTuple_GET_ITEM(PyTuple_GET_ITEM(outputs, j), 0)) == 0;
    PyObject *given = NULL; /* a new reference to a sequence of `stores` items, or NULL for None */
    if (out != Py_None) {
        if (Py_TYPE(out) == (PyTypeObject *)ndarray && stores == 1) given = PyTuple_Pack(1, out);
        else if ((PyTuple_CheckExact(out) || PyList_CheckExact(out)) && PySequence_Fast_GET_SIZE(out) == stores)
            given = PySequence_Tuple(out);
        if (!given) goto fallback;
    }
    for (Py_ssize_t j = 0; j < ni; ++j) {
        PyObject *spec = PyTuple_GET_ITEM(inputs, j);
        PyObject *value = PyTuple_GET_ITEM(values, PyLong_AsSsize_t(PyTuple_GET_ITEM(spec, 0)));
        if (value == Py_None && PyTuple_GET_ITEM(spec, 4) == Py_True) { /* an optional input left out: NULL */
            absent[j] = 1;
            continue;
        }
        if (!take(value, PyUnicode_AsUTF8(PyTuple_GET_ITEM(spec, 1)), PyTuple_GET_ITEM(spec, 2), 0, &views[j])) goto fallback;
        held = j + 1;
        if (PyTuple_GET_ITEM(spec, 3) == Py_True && !nonnegative(&views[j])) goto fallback;
    }
    for (Py_ssize_t j = 0; j < nr; ++j) {
        PyObject *value = PyTuple_GET_ITEM(values, PyLong_AsSsize_t(PyTuple_GET_ITEM(reals, j)));
        if (!PyFloat_CheckExact(value)) goto fallback;
        real[j] = PyFloat_AS_DOUBLE(value);
        if (!(real[j] > 0.0 && real[j] < Py_HUGE_VAL)) goto fallback;
    }
    for (Py_ssize_t j = 0, store = 0; j < no; ++j) {
        PyObject *spec = PyTuple_GET_ITEM(outputs, j);
        const int element = PyLong_AsLong(PyTuple_GET_ITEM(spec, 0)) == 0;
        PyObject *buffer = element && given ? PyTuple_GET_ITEM(given, store) : NULL;
        store += element;
        if (buffer) {
            Py_INCREF(buffer);
        } else {
            buffer = PyObject_CallNoArgs(PyTuple_GET_ITEM(spec, 3));
            if (!buffer) goto failed;
        }
        buffers[made++] = buffer;
        held = ni + j;
        if (!take(buffer, PyUnicode_AsUTF8(PyTuple_GET_ITEM(spec, 1)), PyTuple_GET_ITEM(spec, 2), 1, &views[held])) goto fallback;
        ++held;
        for (Py_ssize_t k = 0; k < held - 1; ++k)
            if ((k >= ni || !absent[k]) && overlap(&views[held - 1], &views[k])) goto fallback;
    }
    for (int d = 0; d < 5; ++d) size[d] = PyLong_AsSsize_t(PyTuple_GET_ITEM(sizes, d));
    void *arrays[SYMBN_MOST_ARRAYS];
    const Py_ssize_t np = PyTuple_GET_SIZE(pointers);
    for (Py_ssize_t j = 0; j < np; ++j) {
        const long at = PyLong_AsLong(PyTuple_GET_ITEM(pointers, j));
        arrays[j] = at >= 0 && absent[at] ? NULL : views[at >= 0 ? at : ni - at - 1].buf;
    }
    void *const function = PyLong_AsVoidPtr(address);
    if (!function) goto failed;
    symbn_packed kernel;
    memcpy(&kernel, &function, sizeof kernel); /* a function's address as data (POSIX's dlsym does the same) */
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = kernel(arrays, size, real, schedule);
    Py_END_ALLOW_THREADS
    if (status != 0) goto fallback; /* the Python path runs it again and reports what went wrong */
    result = PyTuple_New(no);
    if (!result) goto failed;
    for (Py_ssize_t j = 0; j < no; ++j) {
        PyObject *finish = PyTuple_GET_ITEM(PyTuple_GET_ITEM(outputs, j), 4);
        PyObject *value = finish == Py_None ? (Py_INCREF(buffers[j]), buffers[j]) : PyObject_CallOneArg(finish, buffers[j]);
        if (!value) {
            Py_CLEAR(result);
            goto failed;
        }
        PyTuple_SET_ITEM(result, j, value);
    }
    if (no == 1) {
        PyObject *only = PyTuple_GET_ITEM(result, 0);
        Py_INCREF(only);
        Py_DECREF(result);
        result = only;
    }
    goto done;
fallback:
    PyErr_Clear();
    result = Py_None;
    Py_INCREF(result);
    goto done;
failed:
    result = NULL;
done:
    for (Py_ssize_t k = 0; k < held; ++k)
        if (k >= ni || !absent[k]) PyBuffer_Release(&views[k]);
    for (Py_ssize_t k = 0; k < made; ++k) Py_DECREF(buffers[k]);
    Py_XDECREF(given);
    return result;
}

/* bind(ndarray): the array type the entry point takes (numpy.ndarray, exactly). */
static PyObject *bind(PyObject *self, PyObject *type)
{
    (void)self;
    if (!PyType_Check(type)) {
        PyErr_SetString(PyExc_TypeError, "bind takes numpy.ndarray");
        return NULL;
    }
    Py_XDECREF(ndarray);
    Py_INCREF(type);
    ndarray = type;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"call", call, METH_VARARGS, "call(plan, values, out): the kernel's results, or None where the Python path must take the call"},
    {"bind", bind, METH_O, "bind(numpy.ndarray): the array type calls must use"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "symbn_entry", "symbn's compiled entry point", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit_symbn_entry(void)
{
    return PyModule_Create(&module);
}
