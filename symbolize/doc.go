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
//
// Code a runtime compiled (JavaScript under V8, Java, .NET) has no ELF
// symbols. Runtimes started for profilers (node --perf-basic-prof, the JVM
// with perf-map-agent, .NET with DOTNET_PerfMapEnabled=1) write a perf map,
// /tmp/perf-PID.map, with PID and /tmp those of the process's own PID and
// mount namespaces; it is read as /proc/PID/root/tmp/perf-NSPID.map
// (perfmap.go). Code without an ELF name is looked up there: such frames
// have Frame.JIT set, and V8's names become "name (file:line)" in
// Frame.String, while the engine's own code keeps V8's prefix (Builtin:,
// BytecodeHandler:, Stub:, RegExp:...). With --perf-basic-prof alone, V8's
// interpreted functions all run in one trampoline and are named as it
// (Builtins_InterpreterEntryTrampoline); --interpreted-frames-native-stack
// gives each its own entry. Unnamed generated code reads "[anon]+0xoffset".
//
// A frame-pointer walk through code built without frame pointers (OpenSSL's
// assembly, most C) reads data as return addresses. UserStack ends a stack
// at the first address in no executable mapping and no perf map entry, so
// such garbage is never shown; User keeps one frame per address.
package symbolize
