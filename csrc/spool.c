/* The queue's spool I/O for Lua (lua/smtp/queue.lua): files written under an exclusive flock
 * (core.spool_create), a non-blocking flock on an existing file (core.spool_lock), and the
 * names in a directory (core.spool_list). A lock is how a runner tells a live writer or runner
 * from a dead one: the kernel drops it when the process dies, however it dies, so no timeout or
 * PID file is needed to clean up after a kill -9. flock follows the open file, not the name, so a
 * lock taken on tmp/X still holds once X is renamed into msg/. Also core.spool_mkdir. Durability of renames goes through
 * core.fsync_dir (sink.c). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include "core.h"

#define SPOOL_MT "smtp.spool_file"

typedef struct { int fd; } sfile;

static sfile *check_sfile(lua_State *L)
{
    sfile *f = luaL_checkudata(L, 1, SPOOL_MT);
    if (f->fd < 0)
        luaL_error(L, "file already closed");
    return f;
}

static int push_err(lua_State *L, int e, const char *what)
{
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", what, strerror(e));
    return 2;
}

static int lock_nb(int fd)
{
    int r;
    while ((r = flock(fd, LOCK_EX | LOCK_NB)) < 0 && errno == EINTR)
        ;
    return r;
}

static void push_sfile(lua_State *L, int fd)
{
    sfile *f = lua_newuserdata(L, sizeof *f);
    f->fd = fd;
    luaL_setmetatable(L, SPOOL_MT);
}

/* core.spool_create(path) -> file | nil, msg [, "retry"]: a new file (it must not exist), 0600,
 * locked. Creating and locking are two steps, and between them a runner cleaning tmp/ may take
 * the lock and unlink the name: then "retry" (with another name), never a file nobody can find. */
static int l_spool_create(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        return push_err(L, errno, path);
    struct stat st;
    if (lock_nb(fd) < 0 || fstat(fd, &st) < 0 || st.st_nlink == 0) {
        int e = errno;
        close(fd); /* the cleaner that holds it unlinks it */
        push_err(L, e ? e : ENOENT, path);
        lua_pushliteral(L, "retry");
        return 3;
    }
    push_sfile(L, fd);
    return 1;
}

/* core.spool_lock(path) -> file | nil, msg, "locked" | "missing" | nil: the existing file opened
 * for reading and locked, without waiting. */
static int l_spool_lock(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        push_err(L, e, path);
        if (e != ENOENT)
            return 2;
        lua_pushliteral(L, "missing");
        return 3;
    }
    if (lock_nb(fd) < 0) {
        int e = errno;
        close(fd);
        push_err(L, e, path);
        if (e != EWOULDBLOCK)
            return 2;
        lua_pushliteral(L, "locked");
        return 3;
    }
    push_sfile(L, fd);
    return 1;
}

static int l_sfile_write(lua_State *L)
{
    sfile *f = check_sfile(L);
    size_t n;
    const char *p = luaL_checklstring(L, 2, &n);
    while (n) {
        ssize_t w = write(f->fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return push_err(L, errno, "write");
        }
        p += w;
        n -= (size_t)w;
    }
    lua_pushboolean(L, 1);
    return 1;
}

static int l_sfile_sync(lua_State *L)
{
    sfile *f = check_sfile(L);
    if (fsync(f->fd) < 0)
        return push_err(L, errno, "fsync");
    lua_pushboolean(L, 1);
    return 1;
}

static int l_sfile_close(lua_State *L)
{
    sfile *f = luaL_checkudata(L, 1, SPOOL_MT);
    if (f->fd >= 0) {
        close(f->fd); /* drops the lock */
        f->fd = -1;
    }
    return 0;
}

/* core.spool_list(dir) -> { names } | nil, msg: every entry but "." and "..", unsorted. */
static int l_spool_list(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    DIR *d = opendir(path);
    if (!d)
        return push_err(L, errno, path);
    lua_newtable(L);
    lua_Integer n = 0;
    struct dirent *de;
    errno = 0;
    while ((de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        lua_pushstring(L, de->d_name);
        lua_rawseti(L, -2, ++n);
    }
    int e = errno;
    closedir(d);
    if (e)
        return push_err(L, e, path);
    return 1;
}

/* core.spool_mkdir(path) -> true | nil, msg: one directory, 0700 (the spool may hold smarthost
 * credentials); one that exists already is left as it is. */
static int l_spool_mkdir(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    if (mkdir(path, 0700) < 0 && errno != EEXIST)
        return push_err(L, errno, path);
    lua_pushboolean(L, 1);
    return 1;
}

int smtp_open_spool(lua_State *L)
{
    static const luaL_Reg methods[] = {
        { "write", l_sfile_write }, { "sync", l_sfile_sync }, { "close", l_sfile_close },
        { NULL, NULL }
    };
    static const luaL_Reg meta[] = { { "__gc", l_sfile_close }, { NULL, NULL } };
    smtp_newclass(L, SPOOL_MT, methods, meta);
    lua_pushcfunction(L, l_spool_create);
    lua_setfield(L, -2, "spool_create");
    lua_pushcfunction(L, l_spool_lock);
    lua_setfield(L, -2, "spool_lock");
    lua_pushcfunction(L, l_spool_list);
    lua_setfield(L, -2, "spool_list");
    lua_pushcfunction(L, l_spool_mkdir);
    lua_setfield(L, -2, "spool_mkdir");
    return 0;
}
