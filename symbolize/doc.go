// Package symbolize turns the raw instruction addresses that eBPF captures
// with bpf_get_stackid (user and kernel stacks) into function names, and
// builds pprof CPU profiles from them. User addresses are resolved through
// the target's /proc/PID/maps and the mapped ELF files, read through
// /proc/PID/root so that processes in other mount namespaces (containers)
// work; Go binaries get file and line from .gopclntab, other binaries get
// names from .symtab or .dynsym, and stripped ones degrade to module+offset.
// Kernel addresses are resolved with /proc/kallsyms. Parsed files and
// per-process maps are cached with bounds, since the agent symbolizes the
// same few processes over and over.
package symbolize
