/* Module init: multi-phase, with the types and exception classes held in
 * the module state (no C globals), so sub-interpreters and reloads each get
 * their own. */
#include "apsw_backup.h"

static struct PyModuleDef module_def;

/* The module state for one of our types or a Python subclass of it.
 * PyType_GetModuleByDef is not in the 3.10 Limited API, so walk the bases
 * until we reach the heap type created for this module. */
ModuleState *
state_from_type(PyTypeObject *type)
{
    for (PyTypeObject *t = type; t != NULL;
         t = (PyTypeObject *)PyType_GetSlot(t, Py_tp_base)) {
        if (!(PyType_GetFlags(t) & Py_TPFLAGS_HEAPTYPE)) {
            continue;
        }
        PyObject *module = PyType_GetModule(t);
        if (module == NULL) {
            PyErr_Clear();
            continue;
        }
        if (PyModule_GetDef(module) == &module_def) {
            return (ModuleState *)PyModule_GetState(module);
        }
    }
    PyErr_SetString(PyExc_TypeError, "not an apsw_backup type");
    return NULL;
}

static PyObject *
sqlite_lib_version(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    return PyUnicode_FromString(sqlite3_libversion());
}

static PyMethodDef module_methods[] = {
    {"sqlite_lib_version", sqlite_lib_version, METH_NOARGS,
     "sqlite_lib_version() -> str\n\nVersion of the SQLite library loaded "
     "at run time (the system libsqlite3)."},
    {"page_hash", module_page_hash, METH_O,
     "page_hash(data) -> bytes\n\nThe 16-byte page hash of data: XXH3-128 "
     "(seed 0), most significant byte first, as xxHash's tools print it."},
    {"_page_hash_parts", module_page_hash_parts, METH_O,
     "_page_hash_parts(parts) -> bytes\n\npage_hash(b\"\".join(parts)) "
     "without joining them: parts is a list or tuple of bytes, or of "
     "(fd, offset, length): that part of a file, read in blocks."},
    {"_page_hash_variants", module_page_hash_variants, METH_O,
     "_page_hash_variants(data) -> dict\n\nTests only: the hash by each "
     "long-input loop of this build."},
    {"_rollback_vfs", module_rollback_vfs, METH_NOARGS,
     "Private (apsw_backup.copy): the VFS shim that writes a page 1 saying "
     "WAL as saying rollback journal (src/pageshim.h)."},
    {"_incremental_vfs_names", incremental_vfs_names, METH_NOARGS,
     "Private (apsw_backup.incremental): the delta and overlay VFS names."},
    {"_delta_open", incremental_delta_open, METH_VARARGS, "Private."},
    {"_delta_close", incremental_delta_close, METH_O, "Private."},
    {"_delta_result", incremental_delta_result, METH_O, "Private."},
    {"_overlay_open", incremental_overlay_open, METH_VARARGS, "Private."},
    {"_overlay_close", incremental_overlay_close, METH_O, "Private."},
    {"_check_pages", incremental_check_pages, METH_VARARGS, "Private."},
    {"_delta_read_source", incremental_delta_read_source, METH_VARARGS,
     "Private."},
    {"_delta_manifest", incremental_delta_manifest, METH_VARARGS, "Private."},
    {"_delta_slots", incremental_delta_slots, METH_VARARGS, "Private."},
    {"_chain_open", incremental_chain_open, METH_VARARGS, "Private."},
    {"_chain_close", incremental_chain_close, METH_O, "Private."},
    {"_chain_gather", incremental_chain_gather, METH_VARARGS, "Private."},
    {"_chain_file_of", incremental_chain_file_of, METH_VARARGS, "Private."},
    {"_check_stored", incremental_check_stored, METH_VARARGS, "Private."},
    {"_check_inherited", incremental_check_inherited, METH_VARARGS,
     "Private."},
    {NULL, NULL, 0, NULL},
};

#define CONSTANT(name) {#name, name}
static const struct {
    const char *name;
    int value;
} constants[] = {
    CONSTANT(SQLITE_OPEN_READONLY),
    CONSTANT(SQLITE_OPEN_READWRITE),
    CONSTANT(SQLITE_OPEN_CREATE),
    CONSTANT(SQLITE_OPEN_DELETEONCLOSE),
    CONSTANT(SQLITE_OPEN_EXCLUSIVE),
    CONSTANT(SQLITE_OPEN_AUTOPROXY),
    CONSTANT(SQLITE_OPEN_URI),
    CONSTANT(SQLITE_OPEN_MEMORY),
    CONSTANT(SQLITE_OPEN_MAIN_DB),
    CONSTANT(SQLITE_OPEN_TEMP_DB),
    CONSTANT(SQLITE_OPEN_TRANSIENT_DB),
    CONSTANT(SQLITE_OPEN_MAIN_JOURNAL),
    CONSTANT(SQLITE_OPEN_TEMP_JOURNAL),
    CONSTANT(SQLITE_OPEN_SUBJOURNAL),
    CONSTANT(SQLITE_OPEN_NOMUTEX),
    CONSTANT(SQLITE_OPEN_FULLMUTEX),
    CONSTANT(SQLITE_OPEN_SHAREDCACHE),
    CONSTANT(SQLITE_OPEN_PRIVATECACHE),
    CONSTANT(SQLITE_OPEN_WAL),
#ifdef SQLITE_OPEN_SUPER_JOURNAL
    CONSTANT(SQLITE_OPEN_SUPER_JOURNAL),
#endif
#ifdef SQLITE_OPEN_NOFOLLOW
    CONSTANT(SQLITE_OPEN_NOFOLLOW),
#endif
#ifdef SQLITE_OPEN_EXRESCODE
    CONSTANT(SQLITE_OPEN_EXRESCODE),
#endif
    CONSTANT(SQLITE_OK),
    CONSTANT(SQLITE_ERROR),
    CONSTANT(SQLITE_INTERNAL),
    CONSTANT(SQLITE_PERM),
    CONSTANT(SQLITE_ABORT),
    CONSTANT(SQLITE_BUSY),
    CONSTANT(SQLITE_LOCKED),
    CONSTANT(SQLITE_NOMEM),
    CONSTANT(SQLITE_READONLY),
    CONSTANT(SQLITE_INTERRUPT),
    CONSTANT(SQLITE_IOERR),
    CONSTANT(SQLITE_CORRUPT),
    CONSTANT(SQLITE_NOTFOUND),
    CONSTANT(SQLITE_FULL),
    CONSTANT(SQLITE_CANTOPEN),
    CONSTANT(SQLITE_PROTOCOL),
    CONSTANT(SQLITE_EMPTY),
    CONSTANT(SQLITE_SCHEMA),
    CONSTANT(SQLITE_TOOBIG),
    CONSTANT(SQLITE_CONSTRAINT),
    CONSTANT(SQLITE_MISMATCH),
    CONSTANT(SQLITE_MISUSE),
    CONSTANT(SQLITE_NOLFS),
    CONSTANT(SQLITE_AUTH),
    CONSTANT(SQLITE_FORMAT),
    CONSTANT(SQLITE_RANGE),
    CONSTANT(SQLITE_NOTADB),
    CONSTANT(SQLITE_NOTICE),
    CONSTANT(SQLITE_WARNING),
    CONSTANT(SQLITE_ROW),
    CONSTANT(SQLITE_DONE),
    CONSTANT(SQLITE_TXN_NONE),
    CONSTANT(SQLITE_TXN_READ),
    CONSTANT(SQLITE_TXN_WRITE),
};

static int
add_type(PyObject *module, PyType_Spec *spec, PyTypeObject **slot)
{
    *slot = (PyTypeObject *)PyType_FromModuleAndSpec(module, spec, NULL);
    if (*slot == NULL) {
        return -1;
    }
    return PyModule_AddType(module, *slot);
}

static int
module_exec(PyObject *module)
{
    ModuleState *st = (ModuleState *)PyModule_GetState(module);

    if (sqlite3_libversion_number() < 3026000) {
        PyErr_Format(PyExc_ImportError,
                     "apsw_backup needs SQLite 3.26 or newer at run time, but "
                     "the loaded libsqlite3 is %s; upgrade the system SQLite",
                     sqlite3_libversion());
        return -1;
    }
    /* One SQLite busy handler, fork handler and thread-local lock count
     * serve the process: they run Python in the main interpreter
     * (PyGILState_Ensure), which is wrong for a sub-interpreter's
     * connection.  Refused rather than half supported. */
    PyInterpreterState *interp = PyInterpreterState_Get();
    if (interp == NULL) {
        return -1;
    }
    if (PyInterpreterState_GetID(interp) != 0) {
        PyErr_SetString(PyExc_ImportError,
                        "apsw_backup cannot be imported in a "
                        "sub-interpreter: its busy handlers and locks belong "
                        "to the main interpreter. Import it in the main "
                        "interpreter (or in a separate process)");
        return -1;
    }
#ifdef APSW_BACKUP_HOOKS
    if (add_hook_functions(module) < 0) {
        return -1;
    }
#endif
    uri_by_default = sqlite3_compileoption_used("USE_URI");
    if (install_fork_handler() < 0 || add_exceptions(module, st) < 0
        || add_type(module, &connection_spec, &st->ConnectionType) < 0
        || add_type(module, &cursor_spec, &st->CursorType) < 0
        || add_type(module, &backup_spec, &st->BackupType) < 0
        || add_type(module, &recorder_spec, &st->PageRecorderType) < 0) {
        return -1;
    }
    for (size_t i = 0; i < sizeof(constants) / sizeof(constants[0]); i++) {
        if (PyModule_AddIntConstant(module, constants[i].name,
                                    constants[i].value)
            < 0) {
            return -1;
        }
    }
    if (PyModule_AddIntConstant(module, "SQLITE_VERSION_NUMBER",
                                SQLITE_VERSION_NUMBER)
            < 0
        || PyModule_AddStringConstant(module, "__version__",
                                      APSW_BACKUP_VERSION)
               < 0) {
        return -1;
    }
    return 0;
}

static int
module_traverse(PyObject *module, visitproc visit, void *arg)
{
    ModuleState *st = (ModuleState *)PyModule_GetState(module);
    Py_VISIT(st->ConnectionType);
    Py_VISIT(st->CursorType);
    Py_VISIT(st->BackupType);
    Py_VISIT(st->PageRecorderType);
    Py_VISIT(st->Error);
    Py_VISIT(st->ThreadingViolationError);
    Py_VISIT(st->InUseError);
    Py_VISIT(st->ReentrancyError);
    Py_VISIT(st->DestinationLockedError);
    Py_VISIT(st->ConnectionClosedError);
    Py_VISIT(st->CursorClosedError);
    Py_VISIT(st->BindingsError);
    Py_VISIT(st->ForkingViolationError);
    for (int i = 0; i < N_CODE_ERRORS; i++) {
        Py_VISIT(st->code_errors[i]);
    }
    return 0;
}

static int
module_clear(PyObject *module)
{
    ModuleState *st = (ModuleState *)PyModule_GetState(module);
    Py_CLEAR(st->ConnectionType);
    Py_CLEAR(st->CursorType);
    Py_CLEAR(st->BackupType);
    Py_CLEAR(st->PageRecorderType);
    Py_CLEAR(st->Error);
    Py_CLEAR(st->ThreadingViolationError);
    Py_CLEAR(st->InUseError);
    Py_CLEAR(st->ReentrancyError);
    Py_CLEAR(st->DestinationLockedError);
    Py_CLEAR(st->ConnectionClosedError);
    Py_CLEAR(st->CursorClosedError);
    Py_CLEAR(st->BindingsError);
    Py_CLEAR(st->ForkingViolationError);
    for (int i = 0; i < N_CODE_ERRORS; i++) {
        Py_CLEAR(st->code_errors[i]);
    }
    return 0;
}

static void
module_free(void *module)
{
    module_clear((PyObject *)module);
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "apsw_backup._apsw_backup",
    .m_doc = "SQLite online backup with an APSW-style Backup object.",
    .m_size = sizeof(ModuleState),
    .m_methods = module_methods,
    .m_slots = module_slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC
PyInit__apsw_backup(void)
{
    return PyModuleDef_Init(&module_def);
}
