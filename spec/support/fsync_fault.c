/* LD_PRELOAD shim for spec/sink_spec.lua: fsync() of a directory fails with EIO, as on a failing
 * disk, so the spec can show the sink never answers 250 for a rename it could not make durable.
 * fsync() of anything else is the real one. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/stat.h>
#include <unistd.h>

int fsync(int fd)
{
    static int (*real)(int);
    struct stat st;
    if (fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
        errno = EIO;
        return -1;
    }
    if (!real)
        real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    return real(fd);
}
