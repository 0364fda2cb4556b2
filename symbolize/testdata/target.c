/* A target for the PIE and shared-library tests: it prints the runtime
 * addresses of a few functions, then waits to be killed. */
#include <stdio.h>
#include <unistd.h>

int culprit_lib_fn(int x);

__attribute__((noinline)) int culprit_pie_fn(int x) {
	return x * 3 + culprit_lib_fn(x);
}

static __attribute__((noinline)) int culprit_static_fn(int x) {
	return x + 7;
}

int main(int argc, char **argv) {
	(void)argv;
	printf("%p %p %p %p\n", (void *)culprit_pie_fn, (void *)culprit_static_fn,
	       (void *)culprit_lib_fn, (void *)getpid);
	fflush(stdout);
	if (argc > 5)
		return culprit_pie_fn(argc) + culprit_static_fn(argc);
	for (;;)
		pause();
}
