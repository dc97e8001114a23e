/* The reference for the benchmarks: the online backup loop straight on the
 * SQLite C API, linked to the same system libsqlite3 as apsw_backup.
 *
 *   raw_backup SOURCE DEST PAGES [SYNCHRONOUS]
 *
 * Opens SOURCE read-only and DEST (a path or :memory:), sets the
 * destination's PRAGMA synchronous (default OFF, as every contender in
 * run.py does), then times sqlite3_backup_init .. step(PAGES) until DONE ..
 * sqlite3_backup_finish, which is exactly what the Python contenders time.
 * BUSY/LOCKED are retried after 1 ms (none of the timed scenarios sees them).
 *
 * Prints one line: elapsed_seconds cpu_seconds pages steps maxrss_kb
 * sqlite_version.  Exit status 1 on any SQLite error (message on stderr).
 */
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>

static double
seconds(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int
fail(sqlite3 *db, const char *what, int rc)
{
    fprintf(stderr, "raw_backup: %s: %s (%d): %s\n", what, sqlite3_errstr(rc),
            rc, db != NULL ? sqlite3_errmsg(db) : "");
    return 1;
}

int
main(int argc, char **argv)
{
    sqlite3 *src = NULL, *dst = NULL;
    sqlite3_backup *backup;
    long steps = 0;
    int rc;

    if (argc < 4 || argc > 5) {
        fprintf(stderr, "usage: %s SOURCE DEST PAGES [SYNCHRONOUS]\n",
                argv[0]);
        return 2;
    }
    int npages = atoi(argv[3]);
    const char *sync = argc == 5 ? argv[4] : "OFF";

    rc = sqlite3_open_v2(argv[1], &src, SQLITE_OPEN_READONLY, NULL);
    if (rc != SQLITE_OK) {
        return fail(src, "open source", rc);
    }
    rc = sqlite3_open_v2(argv[2], &dst,
                         SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL);
    if (rc != SQLITE_OK) {
        return fail(dst, "open destination", rc);
    }
    char *sql = sqlite3_mprintf("PRAGMA synchronous=%s", sync);
    rc = sqlite3_exec(dst, sql, NULL, NULL, NULL);
    sqlite3_free(sql);
    if (rc != SQLITE_OK) {
        return fail(dst, "PRAGMA synchronous", rc);
    }

    double start = seconds(CLOCK_MONOTONIC);
    double cpu_start = seconds(CLOCK_PROCESS_CPUTIME_ID);
    backup = sqlite3_backup_init(dst, "main", src, "main");
    if (backup == NULL) {
        return fail(dst, "sqlite3_backup_init", sqlite3_errcode(dst));
    }
    do {
        rc = sqlite3_backup_step(backup, npages);
        steps++;
        if (rc == SQLITE_BUSY || rc == SQLITE_LOCKED) {
            sqlite3_sleep(1);
        }
    } while (rc == SQLITE_OK || rc == SQLITE_BUSY || rc == SQLITE_LOCKED);
    int pages = sqlite3_backup_pagecount(backup);
    int finish_rc = sqlite3_backup_finish(backup);
    double elapsed = seconds(CLOCK_MONOTONIC) - start;
    double cpu = seconds(CLOCK_PROCESS_CPUTIME_ID) - cpu_start;
    if (rc != SQLITE_DONE) {
        return fail(dst, "sqlite3_backup_step", rc);
    }
    if (finish_rc != SQLITE_OK) {
        return fail(dst, "sqlite3_backup_finish", finish_rc);
    }

    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    printf("%.6f %.6f %d %ld %ld %s\n", elapsed, cpu, pages, steps,
           usage.ru_maxrss, sqlite3_libversion());
    sqlite3_close(src);
    sqlite3_close(dst);
    return 0;
}
