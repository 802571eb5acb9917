/* The queue's spool I/O for Lua (lua/smtp/queue.lua): files written under an exclusive flock
 * (core.spool_create), a non-blocking flock on an existing file (core.spool_lock), and the
 * names in a directory (core.spool_list). A lock is how a runner tells a live writer or runner
 * from a dead one: the kernel drops it when the process dies, however it dies, so no timeout or
 * PID file is needed to clean up after a kill -9. flock follows the open file, not the name, so a
 * lock taken on tmp/X still holds once X is renamed into msg/. Also core.spool_mkdir. The files
 * are the sink's file objects (sink.c: :write :sync :close), and durability of renames goes
 * through core.fsync_dir (sink.c). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include "core.h"

static int push_err(lua_State *L, int e, const char *what)
{
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", what, strerror(e));
    return 2;
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
    if (smtp_flock_nb(fd) < 0 || fstat(fd, &st) < 0 || st.st_nlink == 0) {
        int e = errno;
        close(fd); /* the cleaner that holds it unlinks it */
        push_err(L, e ? e : ENOENT, path);
        lua_pushliteral(L, "retry");
        return 3;
    }
    smtp_push_file(L, fd);
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
    return smtp_push_locked_file(L, fd, path);
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
