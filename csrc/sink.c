/* The sink's file I/O for Lua: core.sink_file(path, "create" | "append") (exclusive create for
 * Maildir, flock'd append for mbox; :write :sync :size :truncate :close), core.fsync_dir(path),
 * so what the sink stores is on disk before it answers 250, and core.sink_list(dir) (a Maildir
 * folder's files with their mtimes, for the web inbox's index). Nothing here blocks on another
 * process: a held mbox lock is reported, and the sink's Lua retries between other sessions' work. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include "core.h"

#define FILE_MT "smtp.sink_file"

typedef struct { int fd; } lfile;

static lfile *check_file(lua_State *L)
{
    lfile *f = luaL_checkudata(L, 1, FILE_MT);
    if (f->fd < 0)
        luaL_error(L, "file already closed");
    return f;
}

static int push_errno(lua_State *L, const char *what)
{
    int e = errno;
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", what, strerror(e));
    return 2;
}

/* An exclusive flock without waiting (EWOULDBLOCK when another process holds it). */
int smtp_flock_nb(int fd)
{
    int r;
    while ((r = flock(fd, LOCK_EX | LOCK_NB)) < 0 && errno == EINTR)
        ;
    return r;
}

/* A file object (:write :sync :size :truncate :close) owning fd; the spool's files are these too. */
void smtp_push_file(lua_State *L, int fd)
{
    lfile *f = lua_newuserdata(L, sizeof *f);
    f->fd = fd;
    luaL_setmetatable(L, FILE_MT);
}

/* Takes fd's exclusive flock without waiting and pushes it as a file object -> 1; when another
 * process holds the lock: fd closed, nil, "path: ...", "locked" -> 3; another failure -> 2. */
int smtp_push_locked_file(lua_State *L, int fd, const char *path)
{
    if (smtp_flock_nb(fd) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        push_errno(L, path);
        if (e != EWOULDBLOCK)
            return 2;
        lua_pushliteral(L, "locked");
        return 3;
    }
    smtp_push_file(L, fd);
    return 1;
}

/* core.sink_file(path, "create" | "append") -> file | nil, msg [, "locked"]
 * "create" fails if the file exists (Maildir tmp/); "append" takes an exclusive flock (mbox)
 * without waiting: when another process holds it, nil, msg, "locked". The web inbox deletes from
 * an mbox by renaming a rewritten copy over it under this lock, so a lock won on a file the name
 * no longer points at is let go and the name opened again: an append never lands in the old,
 * unlinked copy. */
static int l_sink_file(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    static const char *const modes[] = { "create", "append", NULL };
    int m = luaL_checkoption(L, 2, NULL, modes);
    int flags = O_WRONLY | O_CLOEXEC | O_CREAT | (m == 0 ? O_EXCL : O_APPEND);
    for (int tries = 0;; tries++) {
        int fd = open(path, flags, 0600);
        if (fd < 0)
            return push_errno(L, path);
        if (m == 0) {
            smtp_push_file(L, fd);
            return 1;
        }
        int r = smtp_push_locked_file(L, fd, path);
        struct stat held, named;
        if (r != 1 || fstat(fd, &held) < 0
            || (stat(path, &named) == 0 && named.st_dev == held.st_dev && named.st_ino == held.st_ino))
            return r;
        lfile *f = lua_touserdata(L, -1);
        close(f->fd);
        f->fd = -1;
        lua_pop(L, 1);
        if (tries == 10) {
            /* renamed over again and again: "locked" lets the caller wait and try later */
            lua_pushnil(L);
            lua_pushfstring(L, "%s: replaced while being locked", path);
            lua_pushliteral(L, "locked");
            return 3;
        }
    }
}

static int l_file_write(lua_State *L)
{
    lfile *f = check_file(L);
    size_t n;
    const char *p = luaL_checklstring(L, 2, &n);
    while (n) {
        ssize_t w = write(f->fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return push_errno(L, "write");
        }
        p += w;
        n -= (size_t)w;
    }
    lua_pushboolean(L, 1);
    return 1;
}

static int l_file_sync(lua_State *L)
{
    lfile *f = check_file(L);
    if (fsync(f->fd) < 0)
        return push_errno(L, "fsync");
    lua_pushboolean(L, 1);
    return 1;
}

/* Size of the file now (the mbox offset a message starts at, to cut it back on failure). */
static int l_file_size(lua_State *L)
{
    lfile *f = check_file(L);
    struct stat st;
    if (fstat(f->fd, &st) < 0)
        return push_errno(L, "fstat");
    lua_pushinteger(L, (lua_Integer)st.st_size);
    return 1;
}

static int l_file_truncate(lua_State *L)
{
    lfile *f = check_file(L);
    lua_Integer n = luaL_checkinteger(L, 2);
    if (ftruncate(f->fd, (off_t)n) < 0)
        return push_errno(L, "ftruncate");
    lua_pushboolean(L, 1);
    return 1;
}

static int l_file_close(lua_State *L)
{
    lfile *f = luaL_checkudata(L, 1, FILE_MT);
    if (f->fd >= 0) {
        close(f->fd); /* also drops the flock */
        f->fd = -1;
    }
    return 0;
}

/* core.fsync_dir(path): makes a rename into a directory durable. */
static int l_fsync_dir(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return push_errno(L, path);
    int r = fsync(fd);
    int e = errno;
    close(fd);
    if (r < 0) {
        errno = e;
        return push_errno(L, path);
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* core.sink_list(dir) -> { { name =, mtime =, size = }, ... } | nil, msg: the regular files in
 * dir (names starting with "." left out, as Maildir readers do), unsorted, mtime in seconds with
 * its fraction. One readdir and one fstatat per file: the web inbox indexes a Maildir of
 * thousands of messages at start without opening them. A file gone between the two is skipped. */
static int l_sink_list(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    DIR *d = opendir(path);
    if (!d)
        return push_errno(L, path);
    lua_newtable(L);
    lua_Integer n = 0;
    struct dirent *de;
    errno = 0;
    while ((de = readdir(d)) != NULL) {
        struct stat st;
        if (de->d_name[0] == '.')
            continue;
        if (fstatat(dirfd(d), de->d_name, &st, 0) < 0 || !S_ISREG(st.st_mode)) {
            errno = 0;
            continue;
        }
        lua_createtable(L, 0, 3);
        lua_pushstring(L, de->d_name);
        lua_setfield(L, -2, "name");
        lua_pushnumber(L, (lua_Number)st.st_mtim.tv_sec + (lua_Number)st.st_mtim.tv_nsec / 1e9);
        lua_setfield(L, -2, "mtime");
        lua_pushinteger(L, (lua_Integer)st.st_size);
        lua_setfield(L, -2, "size");
        lua_rawseti(L, -2, ++n);
        errno = 0;
    }
    int e = errno;
    closedir(d);
    if (e) {
        errno = e;
        return push_errno(L, path);
    }
    return 1;
}

int smtp_open_sink(lua_State *L)
{
    static const luaL_Reg fmethods[] = {
        { "write", l_file_write }, { "sync", l_file_sync }, { "size", l_file_size },
        { "truncate", l_file_truncate }, { "close", l_file_close }, { NULL, NULL }
    };
    static const luaL_Reg fmeta[] = { { "__gc", l_file_close }, { NULL, NULL } };
    smtp_newclass(L, FILE_MT, fmethods, fmeta);
    lua_pushcfunction(L, l_sink_file);
    lua_setfield(L, -2, "sink_file");
    lua_pushcfunction(L, l_fsync_dir);
    lua_setfield(L, -2, "fsync_dir");
    lua_pushcfunction(L, l_sink_list);
    lua_setfield(L, -2, "sink_list");
    return 0;
}
