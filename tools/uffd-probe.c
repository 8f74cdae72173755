/*
 * uffd-probe: report which userfaultfd features the running kernel offers.
 *
 * Opens a userfaultfd (raw syscall, so it builds against any libc), does the
 * UFFDIO_API handshake with features=0 and prints the feature mask the kernel
 * hands back.  With features=0 the kernel answers with *every* feature it
 * supports, which is exactly what we want to know.
 *
 * Build:  gcc -O2 -Wall -o uffd-probe tools/uffd-probe.c
 * Output (one "key: value" per line, stable for scripts):
 *   kernel: <uname -r>
 *   machine: <uname -m>
 *   uid: <real uid>
 *   unprivileged_userfaultfd: <0|1|unknown>
 *   dev_userfaultfd: present|absent     (/dev/userfaultfd, Linux 6.1+)
 *   user_mode_only_flag: accepted|rejected (<errno>)   (UFFD_USER_MODE_ONLY, 5.11+)
 *   opened_with: plain|user-mode-only
 *   api: 0x<api>
 *   features: 0x<mask>
 *   <FEATURE_NAME>: yes|no      for the bits this project cares about
 * Exit status: 0 on success, 1 if userfaultfd could not be opened/handshaken.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <unistd.h>

#ifndef __NR_userfaultfd
#if defined(__aarch64__)
#define __NR_userfaultfd 282 /* asm-generic */
#else
#define __NR_userfaultfd 323 /* x86_64 */
#endif
#endif

/* Mirrors <linux/userfaultfd.h> so old kernel headers don't matter. */
struct probe_uffdio_api {
	uint64_t api;
	uint64_t features;
	uint64_t ioctls;
};
#define PROBE_UFFD_API ((uint64_t)0xAA)
#define PROBE_UFFDIO_API _IOWR(0xAA, 0x3F, struct probe_uffdio_api)
#define PROBE_UFFD_USER_MODE_ONLY 1

static const struct {
	int bit;
	const char *name;
} known[] = {
	{0, "PAGEFAULT_FLAG_WP"},
	{1, "EVENT_FORK"},
	{2, "EVENT_REMAP"},
	{3, "EVENT_REMOVE"},
	{4, "MISSING_HUGETLBFS"},
	{5, "MISSING_SHMEM"},
	{6, "EVENT_UNMAP"},
	{7, "SIGBUS"},
	{8, "THREAD_ID"},
	{9, "MINOR_HUGETLBFS"},
	{10, "MINOR_SHMEM"},
	{11, "EXACT_ADDRESS"},
	{12, "WP_HUGETLBFS_SHMEM"},
	{13, "WP_UNPOPULATED"},
	{14, "POISON"},
	{15, "WP_ASYNC"},
	{16, "MOVE"},
};

int main(void)
{
	struct utsname u;
	char buf[16] = "unknown";
	int fd;
	FILE *f;

	if (uname(&u) == 0) {
		printf("kernel: %s\n", u.release);
		printf("machine: %s\n", u.machine);
	}
	printf("uid: %u\n", (unsigned)getuid());
	f = fopen("/proc/sys/vm/unprivileged_userfaultfd", "r");
	if (f) {
		if (fgets(buf, sizeof buf, f))
			buf[strcspn(buf, "\n")] = '\0';
		fclose(f);
	}
	printf("unprivileged_userfaultfd: %s\n", buf);
	printf("dev_userfaultfd: %s\n",
	       access("/dev/userfaultfd", F_OK) == 0 ? "present" : "absent");

	/* Kernels before 5.11 reject the flag with EINVAL. */
	fd = (int)syscall(__NR_userfaultfd,
			  O_CLOEXEC | O_NONBLOCK | PROBE_UFFD_USER_MODE_ONLY);
	if (fd >= 0) {
		printf("user_mode_only_flag: accepted\n");
		close(fd);
	} else {
		printf("user_mode_only_flag: rejected (%s)\n", strerror(errno));
	}

	const char *how = "plain";
	fd = (int)syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (fd < 0 && (errno == EPERM || errno == EACCES)) {
		/* Unprivileged callers may only trap user-mode faults. */
		fd = (int)syscall(__NR_userfaultfd,
				  O_CLOEXEC | O_NONBLOCK | PROBE_UFFD_USER_MODE_ONLY);
		how = "user-mode-only";
	}
	if (fd < 0) {
		printf("error: userfaultfd: %s\n", strerror(errno));
		return 1;
	}

	struct probe_uffdio_api api = {.api = PROBE_UFFD_API, .features = 0};
	if (ioctl(fd, PROBE_UFFDIO_API, &api) < 0) {
		printf("error: UFFDIO_API: %s\n", strerror(errno));
		close(fd);
		return 1;
	}
	printf("opened_with: %s\n", how);
	printf("api: 0x%llx\n", (unsigned long long)api.api);
	printf("features: 0x%llx\n", (unsigned long long)api.features);
	for (size_t i = 0; i < sizeof known / sizeof known[0]; i++)
		printf("%s: %s\n", known[i].name,
		       (api.features >> known[i].bit) & 1 ? "yes" : "no");
	close(fd);
	return 0;
}
