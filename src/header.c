/* The one way this library reads a database file's header: through the
 * sqlite3_file SQLite itself has open (SQLITE_FCNTL_FILE_POINTER + xRead).
 *
 * Never open() a file SQLite may have open in this process: closing any
 * descriptor of a file drops every POSIX lock the process holds on it,
 * SQLite's included (sqlite.org/howtocorrupt.html, section 2.2), and another
 * process may then write inside a transaction of ours.  SQLite's own handle
 * is never closed by us.
 */
#include "apsw_backup.h"

int
read_file_header(sqlite3 *db, const char *schema, unsigned char *buf, int size,
                 int *io_rc)
{
    sqlite3_file *file = NULL;
    sqlite3_int64 length = 0;
    int rc;
    *io_rc = SQLITE_OK;
    if (sqlite3_file_control(db, schema, SQLITE_FCNTL_FILE_POINTER, &file)
            != SQLITE_OK
        || file == NULL || file->pMethods == NULL) {
        return -1; /* no such schema, or no file behind it */
    }
    if ((rc = file->pMethods->xFileSize(file, &length)) != SQLITE_OK) {
        *io_rc = rc;
        return -1;
    }
    int want = length < size ? (int)length : size;
    if (want <= 0) {
        return 0;
    }
    rc = file->pMethods->xRead(file, buf, want, 0);
    if (rc != SQLITE_OK) {
        *io_rc = rc; /* a short read: the file shrank meanwhile */
        return -1;
    }
    return want;
}

void
parse_file_header(const unsigned char *h, int length, FileHeader *out)
{
    memset(out, 0, sizeof(*out));
    if (length < 100 || memcmp(h, "SQLite format 3", 16) != 0) {
        return;
    }
    int size = (h[16] << 8) | h[17];
    out->is_database = 1;
    out->page_size = size == 1 ? 65536 : size;
    out->wal = h[18] == 2 && h[19] == 2;
}
