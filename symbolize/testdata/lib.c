/* Shared library for the symbolize tests. */
__attribute__((noinline)) int culprit_lib_fn(int x) {
	return x * x + 1;
}
