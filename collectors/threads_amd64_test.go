package collectors

import (
	"testing"

	"golang.org/x/sys/unix"
)

// TestSyscallNamesAMD64 checks the hand-written table against x/sys.
func TestSyscallNamesAMD64(t *testing.T) {
	want := map[int]string{
		unix.SYS_READ: "read", unix.SYS_WRITE: "write", unix.SYS_POLL: "poll",
		unix.SYS_PREAD64: "pread64", unix.SYS_PWRITE64: "pwrite64", unix.SYS_SELECT: "select",
		unix.SYS_MSYNC: "msync", unix.SYS_NANOSLEEP: "nanosleep", unix.SYS_CONNECT: "connect",
		unix.SYS_ACCEPT: "accept", unix.SYS_SENDTO: "sendto", unix.SYS_RECVFROM: "recvfrom",
		unix.SYS_SENDMSG: "sendmsg", unix.SYS_RECVMSG: "recvmsg", unix.SYS_WAIT4: "wait4",
		unix.SYS_FLOCK: "flock", unix.SYS_FSYNC: "fsync", unix.SYS_FDATASYNC: "fdatasync",
		unix.SYS_RT_SIGTIMEDWAIT: "rt_sigtimedwait", unix.SYS_FUTEX: "futex",
		unix.SYS_CLOCK_NANOSLEEP: "clock_nanosleep", unix.SYS_EPOLL_WAIT: "epoll_wait",
		unix.SYS_OPENAT: "openat", unix.SYS_PSELECT6: "pselect6", unix.SYS_PPOLL: "ppoll",
		unix.SYS_SYNC_FILE_RANGE: "sync_file_range", unix.SYS_EPOLL_PWAIT: "epoll_pwait",
		unix.SYS_ACCEPT4: "accept4", unix.SYS_IO_URING_ENTER: "io_uring_enter",
		unix.SYS_EPOLL_PWAIT2: "epoll_pwait2", unix.SYS_PAUSE: "pause", unix.SYS_RT_SIGSUSPEND: "rt_sigsuspend",
		unix.SYS_IOCTL: "ioctl", unix.SYS_FCNTL: "fcntl", unix.SYS_READV: "readv", unix.SYS_WRITEV: "writev",
		unix.SYS_RECVMMSG: "recvmmsg", unix.SYS_SENDMMSG: "sendmmsg",
	}
	for nr, name := range want {
		if got := syscallName(nr); got != name {
			t.Errorf("syscallName(%d) = %q, want %q", nr, got, name)
		}
	}
	if len(syscallNamesAMD64) != len(want) {
		t.Errorf("table has %d entries, the check %d", len(syscallNamesAMD64), len(want))
	}
}
