/* Who is inside a call, and fork: the bookkeeping behind the threading and
 * ownership rules of src/README.md.
 *
 * `inuse` on a Connection or Backup counts the calls inside it across all
 * threads; that is what makes a second thread get ThreadingViolationError.
 * But finish() must tell two callers apart that both see `inuse`: another
 * thread (wait for its call to end, then finish) and a callback running
 * inside a call on the same objects in this very thread (waiting would
 * wait for itself: refuse).  So each thread also keeps the stack of the
 * objects it is inside.  Calls nest strictly per thread, so a stack works.
 */
#include "apsw_backup.h"

#include <pthread.h>
#include <time.h>

_Thread_local CallStack call_stack;

void
calls_at_rest(void)
{
    /* This thread is in none of our calls now: a finish or finalize
     * deferred while its connection was busy may be due. */
    if (pending_finishes != NULL) {
        backup_finish_pending();
    }
    if (statements_pending()) {
        statements_finalize_pending(NULL);
    }
}

/* Deeper nesting than MAX_CALL_DEPTH needs callbacks calling back into
 * callbacks 16 deep; past it in_call_here() answers yes, which only ever
 * refuses. */
int
in_call_here(const void *object)
{
    const CallStack *here = &call_stack;
    if (object == NULL) {
        return 0;
    }
    if (here->depth > MAX_CALL_DEPTH) {
        return 1;
    }
    for (int i = 0; i < here->depth; i++) {
        if (here->objects[i] == object) {
            return 1;
        }
    }
    return 0;
}

int
in_any_call_here(void)
{
    return call_stack.depth > 0;
}

int
call_depth_here(void)
{
    return call_stack.depth;
}

int
calls_here_count(const void *object)
{
    const CallStack *here = &call_stack;
    int count = 0;
    if (object == NULL) {
        return 0;
    }
    for (int i = 0; i < here->depth && i < MAX_CALL_DEPTH; i++) {
        count += here->objects[i] == object;
    }
    return here->depth > MAX_CALL_DEPTH ? count + 1 : count;
}

void
wait_a_little(long *wait_us)
{
    struct timespec ts = {0, *wait_us * 1000};
    Py_BEGIN_ALLOW_THREADS
    nanosleep(&ts, NULL);
    Py_END_ALLOW_THREADS
    *wait_us = *wait_us * 2 > 5000 ? 5000 : *wait_us * 2;
}

volatile unsigned long fork_generation;

static void
after_fork_in_child(void)
{
    fork_generation++;
}

int
install_fork_handler(void)
{
    /* Once per process, however many interpreters import the module. */
    static int installed;
    if (installed) {
        return 0;
    }
    int err = pthread_atfork(NULL, NULL, after_fork_in_child);
    if (err != 0) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    installed = 1;
    return 0;
}

PyObject *
raise_forked(ModuleState *st, const char *what)
{
    PyErr_Format(
        st->ForkingViolationError,
        "This %s was opened before os.fork() and belongs to the "
        "parent process: using its SQLite state in the child would "
        "corrupt the parent's databases. Open a new Connection in the "
        "child (objects inherited this way are left alone, never "
        "closed or finished, when the child exits)",
        what);
    return NULL;
}
