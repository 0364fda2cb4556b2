package signals

// The signal catalogue: every signal the agent writes is declared here,
// once, and nowhere else. Writers (collectors, probes, the OTLP receiver,
// the exporters, the agent) put through these Descs and readers (rules,
// the CLI, tests) read through them: the Store's read methods take a
// *Desc, so a signal misspelt anywhere is a compile error rather than a
// series nobody writes or nobody reads. This file imports nothing, so
// that data keeps flowing one way: writers -> signals -> rules.
//
// A var is named after its signal (listen_overflows_total is
// ListenOverflowsTotal) and grouped by what writes it. Every name here is
// fixed: no signal name is built at run time (the netstat collector reads
// a fixed table of fields, not every field of /proc/net/netstat; what
// varies, such as a sysctl's name, is a label).
//
// catalog_test.go fails when a Desc is built anywhere else (a test may
// build one of a made-up name, to test the store or an exporter) and when
// two share a name; docs/docs_test.go wants every name of this file in
// docs/DESIGN.md section 5.

// The accept_queue collector (collectors/accept_queue.go): every listening
// socket of the target's network namespace, by addr and port, read by
// sock_diag every collect.fast_interval.
var (
	ListenQueueLength = &Desc{Name: "listen_queue_length", Kind: Gauge,
		Help: "Connections waiting in the listener's accept queue (idiag_rqueue), summed over an SO_REUSEPORT group."}
	ListenBacklog = &Desc{Name: "listen_backlog", Kind: Gauge,
		Help: "Maximum accept queue length of the listener (idiag_wqueue: min(listen backlog, somaxconn)), summed over an SO_REUSEPORT group."}
	ListenQueueFull = &Desc{Name: "listen_queue_full", Kind: Gauge,
		Help: "1 when the accept queue was full at this sample (queue length > backlog, the kernel's sk_acceptq_is_full), else 0."}
	ListenSynRecv = &Desc{Name: "listen_syn_recv", Kind: Gauge,
		Help: "Half-open connections (SYN_RECV) waiting for the handshake to complete on the listener."}
	ListenSynRecvSources = &Desc{Name: "listen_syn_recv_sources", Kind: Gauge,
		Help: "Distinct remote addresses of the listener's half-open connections: a SYN flood comes from many, a burst of real clients from few."}
	ListenOverflowsTotal = &Desc{Name: "listen_overflows_total", Kind: Counter,
		Help: "Share of the namespace's ListenOverflows attributed to this listener by queue-full sampling and per-port probe counters."}
	ListenOverflowsUnattributedTotal = &Desc{Name: "listen_overflows_unattributed_total", Kind: Counter,
		Help: "ListenOverflows increments no listener could be blamed for (none was seen full or queueing, and no per-port evidence came within half a second of the read)."}
	TCPExtListenOverflowsSampledTotal = &Desc{Name: "tcp_ext_listen_overflows_sampled_total", Kind: Counter,
		Help: "TcpExt ListenOverflows of the namespace, read at the fast cadence together with the listener queues."}
	TCPExtListenDropsSampledTotal = &Desc{Name: "tcp_ext_listen_drops_sampled_total", Kind: Counter,
		Help: "TcpExt ListenDrops of the namespace, read at the fast cadence together with the listener queues."}
)

// The sockets collector (collectors/sockets.go): a sock_diag dump of the
// namespace's TCP sockets, counted by owner, port, remote and state.
var (
	TCPSockets = &Desc{Name: "tcp_sockets", Kind: Gauge,
		Help: `TCP sockets of the target's network namespace by owner, local port and state. owner is "target" (the target and its children), "agent" (culprit), another process's command name, or "unknown" (no visible process holds it: time-wait sockets of connections not known to be the target's, a process in another PID namespace). port is a port some socket of the namespace listens on (its connections belong to the listener's owner), or one the target listened on while its connections remain (a server that closed its listener on SIGTERM), "ephemeral" for every other local port (the client side of outbound connections), or "other" for listening ports past the MaxPorts busiest.`}
	TCPSocketsByRemote = &Desc{Name: "tcp_sockets_by_remote", Kind: Gauge,
		Help: `Outbound TCP sockets (local port not a listening one) by owner, state (ESTABLISHED, SYN_SENT, FIN_WAIT1, FIN_WAIT2, TIME_WAIT, CLOSE_WAIT) and remote ip:port, for the MaxRemotes remotes with the most sockets (the target's first); the rest are summed under remote="other". TIME_WAIT piling up toward one remote, or ESTABLISHED flat at a ceiling toward one upstream (an exhausted connection pool), show here.`}
	TCPCloseWaitOldestSeconds = &Desc{Name: "tcp_close_wait_oldest_seconds", Kind: Gauge,
		Help: "Per owner and local port, the longest time since the peer last sent anything (tcp_info last_ack_recv, last_data_recv) among CLOSE_WAIT sockets: how long the app has been holding a socket its peer closed. 0 when there is none."}
	TCPEstablishedIdleSeconds = &Desc{Name: "tcp_established_idle_seconds", Kind: Gauge,
		Help: "Per owner and remote of tcp_sockets_by_remote, the longest time an ESTABLISHED outbound socket has neither sent nor received data (tcp_info last_data_sent, last_data_recv). 0 when there is none."}
	TCPRetransmitsCurrent = &Desc{Name: "tcp_retransmits_current", Kind: Gauge,
		Help: "Per owner and local port, the sum of tcp_info retransmits: timeout retransmissions not yet acknowledged, right now. Non-zero means peers are not answering."}
	ProcessTCPSockets = &Desc{Name: "process_tcp_sockets", Kind: Gauge,
		Help: "TCP sockets the target (and its children) hold, by state: the server side of connections to its listeners and its own outbound connections. CLOSE_WAIT growing means the app never closes sockets its peers closed."}
	TCPSocketsDumped = &Desc{Name: "tcp_sockets_dumped", Kind: Gauge,
		Help: "TCP sockets (all states, IPv4 and IPv6) in the target's network namespace, as far as the dump went (see sockets_dump_truncated_total). Not named _total: it is a gauge."}
	SocketsDumpSeconds = &Desc{Name: "sockets_dump_seconds", Kind: Gauge,
		Help: "How long the sockets collector's last sock_diag dump and its aggregation took."}
	SocketsDumpTruncatedTotal = &Desc{Name: "sockets_dump_truncated_total", Kind: Counter,
		Help: "Dumps the sockets collector stopped at MaxSockets sockets; the counts of those cycles cover part of the namespace only."}
	SocketOwnerFDsReadTotal = &Desc{Name: "socket_owner_fds_read_total", Kind: Counter,
		Help: "File descriptor table entries read to learn which process holds which socket (the cost of ownership; it grows only when new sockets appear)."}
)

// The netstat collector (collectors/netstat.go): the namespace's TCP
// counters of /proc/PID/net/netstat (TcpExt) and /proc/PID/net/snmp (Tcp).
// Only these fields become signals: the table is explicit rather than
// one signal per field, so that the names rules depend on stay stable
// when a kernel adds counters.
var (
	TCPExtListenOverflowsTotal = &Desc{Name: "tcp_ext_listen_overflows_total", Kind: Counter,
		Help: "Completed handshakes or SYNs dropped because a listener's accept queue was full (TcpExt ListenOverflows), whole network namespace."}
	TCPExtListenDropsTotal = &Desc{Name: "tcp_ext_listen_drops_total", Kind: Counter,
		Help: "Segments dropped by listening sockets for any reason, overflows included (TcpExt ListenDrops)."}
	TCPExtReqQFullDropTotal = &Desc{Name: "tcp_ext_req_q_full_drop_total", Kind: Counter,
		Help: "SYNs dropped because the SYN queue was full and syncookies were off (TcpExt TCPReqQFullDrop)."}
	TCPExtReqQFullDoCookiesTotal = &Desc{Name: "tcp_ext_req_q_full_do_cookies_total", Kind: Counter,
		Help: "SYNs answered with a syncookie because the SYN queue was full (TcpExt TCPReqQFullDoCookies)."}
	TCPExtSyncookiesSentTotal = &Desc{Name: "tcp_ext_syncookies_sent_total", Kind: Counter,
		Help: "Syncookies sent (TcpExt SyncookiesSent)."}
	TCPExtSyncookiesRecvTotal = &Desc{Name: "tcp_ext_syncookies_recv_total", Kind: Counter,
		Help: "Valid syncookies received (TcpExt SyncookiesRecv)."}
	TCPExtSyncookiesFailedTotal = &Desc{Name: "tcp_ext_syncookies_failed_total", Kind: Counter,
		Help: "Invalid syncookies received (TcpExt SyncookiesFailed)."}
	TCPExtTimeWaitOverflowTotal = &Desc{Name: "tcp_ext_time_wait_overflow_total", Kind: Counter,
		Help: "TIME_WAIT sockets not created because tcp_max_tw_buckets was reached (TcpExt TCPTimeWaitOverflow)."}
	TCPExtAbortOnDataTotal = &Desc{Name: "tcp_ext_abort_on_data_total", Kind: Counter,
		Help: "Connections reset because data arrived after the application closed (TcpExt TCPAbortOnData)."}
	TCPExtAbortOnCloseTotal = &Desc{Name: "tcp_ext_abort_on_close_total", Kind: Counter,
		Help: "Connections reset because the application closed with unread data (TcpExt TCPAbortOnClose)."}
	TCPExtAbortOnTimeoutTotal = &Desc{Name: "tcp_ext_abort_on_timeout_total", Kind: Counter,
		Help: "Connections aborted after retransmission timeouts (TcpExt TCPAbortOnTimeout)."}
	TCPExtAbortOnMemoryTotal = &Desc{Name: "tcp_ext_abort_on_memory_total", Kind: Counter,
		Help: "Connections aborted for lack of memory or too many orphans (TcpExt TCPAbortOnMemory)."}
	TCPExtTimeWaitTotal = &Desc{Name: "tcp_ext_time_wait_total", Kind: Counter,
		Help: "Sockets that finished TIME_WAIT (TcpExt TW)."}
	TCPExtSynRetransTotal = &Desc{Name: "tcp_ext_syn_retrans_total", Kind: Counter,
		Help: "SYN and SYN-ACK retransmissions (TcpExt TCPSynRetrans)."}
	TCPActiveOpensTotal = &Desc{Name: "tcp_active_opens_total", Kind: Counter,
		Help: "Connections opened by this namespace (Tcp ActiveOpens)."}
	TCPPassiveOpensTotal = &Desc{Name: "tcp_passive_opens_total", Kind: Counter,
		Help: "Connections accepted from peers (Tcp PassiveOpens)."}
	TCPAttemptFailsTotal = &Desc{Name: "tcp_attempt_fails_total", Kind: Counter,
		Help: "Connection attempts that failed (Tcp AttemptFails)."}
	TCPEstabResetsTotal = &Desc{Name: "tcp_estab_resets_total", Kind: Counter,
		Help: "Established connections reset (Tcp EstabResets)."}
	TCPInErrsTotal = &Desc{Name: "tcp_in_errs_total", Kind: Counter,
		Help: "TCP segments received in error (Tcp InErrs)."}
	TCPOutRstsTotal = &Desc{Name: "tcp_out_rsts_total", Kind: Counter,
		Help: "TCP segments sent with RST (Tcp OutRsts)."}
	TCPRetransSegsTotal = &Desc{Name: "tcp_retrans_segs_total", Kind: Counter,
		Help: "TCP segments retransmitted (Tcp RetransSegs)."}
	TCPCurrEstab = &Desc{Name: "tcp_curr_estab", Kind: Gauge,
		Help: "TCP connections now ESTABLISHED or CLOSE_WAIT (Tcp CurrEstab), whole network namespace."}
)

// The sysctl collector (collectors/sysctl.go): one series per setting, its
// name label the sysctl (collectors.sysctlNames).
var (
	Sysctl = &Desc{Name: "sysctl", Kind: Gauge,
		Help: "Value of a kernel setting in the target's network namespace; name is the sysctl, ip_local_port_range as .min and .max."}
)

// The threads collector (collectors/threads.go): /proc/PID/task.
var (
	ProcessThreads = &Desc{Name: "process_threads", Kind: Gauge,
		Help: "Threads of the target and its child processes (a prefork server's workers) by scheduler state letter (R running, S sleeping, D uninterruptible, T stopped by a signal, t stopped by a tracer, ...), among the examined threads."}
	ProcessChildThreads = &Desc{Name: "process_child_threads", Kind: Gauge,
		Help: "Threads of the target's child processes by scheduler state letter, among the examined threads: the part of process_threads that is not the target's own."}
	ProcessThreadsInSyscall = &Desc{Name: "process_threads_in_syscall", Kind: Gauge,
		Help: "Threads of the target and its child processes that sleep (neither running nor stopped), by the system call they wait in (none: blocked outside a system call)."}
	ProcessNumThreads = &Desc{Name: "process_num_threads", Kind: Gauge,
		Help: "Threads of the target (every entry of /proc/PID/task, not bounded by the examined maximum)."}
	ThreadStatCPUSecondsTotal = &Desc{Name: "thread_stat_cpu_seconds_total", Kind: Counter,
		Help: "CPU time of each thread of the target, from /proc task stat (user+system, 10 ms ticks); the fallback when the sched probe does not run."}
	ThreadSchedstatRunqWaitSecondsTotal = &Desc{Name: "thread_schedstat_runq_wait_seconds_total", Kind: Counter,
		Help: "Time each thread of the target waited on a run queue, from /proc task schedstat."}
)

// The fds collector (collectors/fds.go): /proc/PID/fd and limits.
var (
	ProcessOpenFDs = &Desc{Name: "process_open_fds", Kind: Gauge,
		Help: "Open file descriptors of the target by what they point at (socket, file, pipe, anon_eventfd, ...)."}
	ProcessFDsOpen = &Desc{Name: "process_fds_open", Kind: Gauge,
		Help: "Open file descriptors of the target."}
	ProcessFDLimit = &Desc{Name: "process_fd_limit", Kind: Gauge,
		Help: "RLIMIT_NOFILE of the target (type soft or hard)."}
)

// The memory collector (collectors/memory.go): /proc/PID/status,
// smaps_rollup and the threads' status files.
var (
	ProcessResidentMemoryBytes = &Desc{Name: "process_resident_memory_bytes", Kind: Gauge,
		Help: "Resident memory of the target (VmRSS)."}
	ProcessMemoryRSSBytes = &Desc{Name: "process_memory_rss_bytes", Kind: Gauge,
		Help: "Resident memory of the target by kind: anon (heap, stacks, allocator arenas), file (mapped files), shmem."}
	ProcessVirtualMemoryBytes = &Desc{Name: "process_virtual_memory_bytes", Kind: Gauge,
		Help: "Virtual memory size of the target (VmSize)."}
	ProcessMemoryPSSBytes = &Desc{Name: "process_memory_pss_bytes", Kind: Gauge,
		Help: "Proportional set size of the target (smaps_rollup Pss): shared pages split among their users."}
	ProcessMemorySwapBytes = &Desc{Name: "process_memory_swap_bytes", Kind: Gauge,
		Help: "Memory of the target swapped out (smaps_rollup Swap)."}
	ProcessContextSwitchesTotal = &Desc{Name: "process_context_switches_total", Kind: Counter,
		Help: "Context switches of the target's threads: voluntary (blocked, waiting) or nonvoluntary (preempted)."}
)

// The cgroup collector (collectors/cgroup.go): the target's memory cgroup.
var (
	CgroupInfo = &Desc{Name: "cgroup_info", Kind: Gauge,
		Help: "1 for the target's memory cgroup: its version (1 or 2) and path."}
	CgroupMemoryUsageBytes = &Desc{Name: "cgroup_memory_usage_bytes", Kind: Gauge,
		Help: "Memory charged to the target's cgroup (v2 memory.current, v1 memory.usage_in_bytes)."}
	CgroupMemoryLimitBytes = &Desc{Name: "cgroup_memory_limit_bytes", Kind: Gauge,
		Help: "Memory limit of the target's cgroup (absent when unlimited)."}
	CgroupMemoryStatBytes = &Desc{Name: "cgroup_memory_stat_bytes", Kind: Gauge,
		Help: "Memory of the target's cgroup by kind: anon, file (page cache), shmem, kernel, sock."}
	CgroupMemoryEventsTotal = &Desc{Name: "cgroup_memory_events_total", Kind: Counter,
		Help: "Memory events of the target's cgroup: oom, oom_kill, max (limit hit), high."}
	CgroupMemoryPressureAvg10Ratio = &Desc{Name: "cgroup_memory_pressure_avg10_ratio", Kind: Gauge,
		Help: "Share of the last 10 s tasks of the cgroup stalled on memory (PSI; type some or full)."}
)

// The cpu_cgroup collector (collectors/cpu_cgroup.go): the target's CPU
// cgroup, its quota and throttling.
var (
	CgroupCPUInfo = &Desc{Name: "cgroup_cpu_info", Kind: Gauge,
		Help: "1 for the target's CPU cgroup: its version (1 or 2), path, and where its usage comes from (usage: cpuacct, cpu.stat, or unknown_root, unknown_other_cgroup, unknown_missing)."}
	CgroupCPUPeriodsTotal = &Desc{Name: "cgroup_cpu_periods_total", Kind: Counter,
		Help: "CFS bandwidth periods in which the target's cgroup had runnable tasks (v1 and v2 cpu.stat nr_periods; counted only under a quota)."}
	CgroupCPUThrottledPeriodsTotal = &Desc{Name: "cgroup_cpu_throttled_periods_total", Kind: Counter,
		Help: "CFS periods in which the target's cgroup used up its quota and was throttled (cpu.stat nr_throttled)."}
	CgroupCPUThrottledSecondsTotal = &Desc{Name: "cgroup_cpu_throttled_seconds_total", Kind: Counter,
		Help: "Time the target cgroup's runnable tasks spent throttled, summed over CPUs (v1 cpu.stat throttled_time, v2 throttled_usec)."}
	CgroupCPUUsageSecondsTotal = &Desc{Name: "cgroup_cpu_usage_seconds_total", Kind: Counter,
		Help: "CPU time used by the target's cgroup (v1 cpuacct.usage, v2 cpu.stat usage_usec)."}
	CgroupCPUQuotaCores = &Desc{Name: "cgroup_cpu_quota_cores", Kind: Gauge,
		Help: "CPU limit of the target's cgroup in cores: CFS quota / period (absent when unlimited)."}
	CgroupCPUPeriodSeconds = &Desc{Name: "cgroup_cpu_period_seconds", Kind: Gauge,
		Help: "CFS bandwidth period of the target's cgroup: a throttled task waits for the next one (absent when unlimited)."}
	CgroupCPUPressureAvg10Ratio = &Desc{Name: "cgroup_cpu_pressure_avg10_ratio", Kind: Gauge,
		Help: "Share of the last 10 s tasks of the cgroup waited for a CPU (PSI, v2 only; type some or full)."}
)

// The heap collector (collectors/pprof.go): the target's heap profile,
// pulled over HTTP from pprof.heap_url.
var (
	HeapInuseBytes = &Desc{Name: "heap_inuse_bytes", Kind: Gauge,
		Help: "Live heap of the app: the sum of inuse_space over its heap profile (sampled estimate, as of the app's last GC)."}
	HeapInuseObjects = &Desc{Name: "heap_inuse_objects", Kind: Gauge,
		Help: "Live heap objects of the app: the sum of inuse_objects over its heap profile."}
	HeapAllocBytesTotal = &Desc{Name: "heap_alloc_bytes_total", Kind: Counter,
		Help: "Bytes the app allocated since it started: the sum of alloc_space over its heap profile, when the profile has it."}
	PprofLastSuccessTimestampSeconds = &Desc{Name: "pprof_last_success_timestamp_seconds", Kind: Gauge,
		Help: "Unix time of the last heap profile fetched and parsed."}
	PprofFetchesTotal = &Desc{Name: "pprof_fetches_total", Kind: Counter,
		Help: "Heap profiles fetched and parsed."}
	PprofFetchErrorsTotal = &Desc{Name: "pprof_fetch_errors_total", Kind: Counter,
		Help: "Heap profile fetches that failed, by reason: connect, timeout, http_status, too_large, malformed."}
)

// Every probe (probes/load.go, probes/cpuprofile.go): its own event
// counts, labelled with the probe.
var (
	ProbeEventsTotal = &Desc{Name: "probe_events_total", Kind: Counter,
		Help: "Events read from the probe's ring buffer."}
	ProbeEventsLostTotal = &Desc{Name: "probe_events_lost_total", Kind: Counter,
		Help: "Events the probe's ring buffer had no room for."}
)

// The tcplisten probe (probes/tcplisten.go), labelled with the local
// port. The accept_queue collector reads them to attribute drops to a
// listener.
var (
	TCPListenOverflowDropsTotal = &Desc{Name: "tcp_listen_overflow_drops_total", Kind: Counter,
		Help: "Completed handshakes dropped because the listener's accept queue was full (kfree_skb TCP_LISTEN_OVERFLOW)."}
	TCPSynAckRetransmitsTotal = &Desc{Name: "tcp_synack_retransmits_total", Kind: Counter,
		Help: "SYN-ACKs the listener retransmitted; they keep coming while its accept queue stays full."}
	TCPListenHandshakesTotal = &Desc{Name: "tcp_listen_handshakes_total", Kind: Counter,
		Help: "Handshakes completed on the listener (SYN_RECV to ESTABLISHED); while its queue is full, each one needed an accept."}
)

// The sockcalls probe (probes/sockcalls.go): what the target process (and
// its children) did with its own TCP sockets, by its own system calls.
var (
	ProcessAcceptsTotal = &Desc{Name: "process_accepts_total", Kind: Counter,
		Help: "Connections the target accepted (accept/accept4 that returned a socket), by listener port (eBPF sys_exit). Unlike completed handshakes, these are the app's own accepts. Counted while process_accepts_counted_since_seconds is not 0: by default while a listener's queue is half full or more, or drops SYNs (sockcalls.accepts)."}
	ProcessAcceptsCountedSince = &Desc{Name: "process_accepts_counted_since_seconds", Kind: Gauge,
		Help: "Unix time since which every accept of the target has been counted in process_accepts_total; 0 while accepts are not counted (sockcalls.accepts = \"queued\" counts them while a listener's queue is half full or more, or drops SYNs, and sockcalls.accepts_linger after)."}
	ProcessConnectsTotal = &Desc{Name: "process_connects_total", Kind: Counter,
		Help: "TCP connects of the target that sent a SYN, by remote ip:port, counted when the handshake ended (established, failed or given up); remotes beyond sockcalls.max_remotes are remote=\"other\"."}
	ProcessConnectErrorsTotal = &Desc{Name: "process_connect_errors_total", Kind: Counter,
		Help: "TCP connects of the target that failed, by errno and remote: EADDRNOTAVAIL (no local port left toward the remote: inferred from a connect that failed within the call before its SYN went out; the errno itself is not seen), or what ended the handshake (ECONNREFUSED: a reset; ETIMEDOUT: SYN retries exhausted; EHOSTUNREACH...). Failures before a connect reaches SYN_SENT (no route, a bad address) are not counted."}
	ProcessUnreadOldestSeconds = &Desc{Name: "process_unread_oldest_seconds", Kind: Gauge,
		Help: "Age of the oldest data waiting unread on the target's TCP sockets (0 when none, or while not watched: process_unread_watched_since_seconds): requests wait for an event loop that is busy or asleep, whatever call it sleeps in. Data already queued when watching began counts from then: a lower bound."}
	ProcessUnreadSockets = &Desc{Name: "process_unread_sockets", Kind: Gauge,
		Help: "The target's TCP sockets whose data has waited unread for longer than one poll interval (0 while not watched)."}
	ProcessUnreadWatchedSince = &Desc{Name: "process_unread_watched_since_seconds", Kind: Gauge,
		Help: "Unix time since which data left unread on the target's sockets is watched (process_unread_*); 0 while it is not (sockcalls.unread = \"blocked\" watches while a thread of the target sleeps where work may wait for it, and sockcalls.unread_linger after)."}
)

// The tcplife probe (probes/tcplife.go): TCP connections of the target's
// namespace, how they opened and ended.
var (
	TCPConnectionEndsTotal = &Desc{Name: "tcp_connection_ends_total", Kind: Counter,
		Help: "Established connections of the target's namespace that ended, by how: peer_close (the peer's FIN came first), local_close, reset_received (eBPF inet_sock_set_state, tcp_receive_reset)."}
	TCPActiveOpensSeenTotal = &Desc{Name: "tcp_active_opens_seen_total", Kind: Counter,
		Help: "Outbound connections of the target's namespace whose handshake completed (eBPF)."}
	TCPConnectSecondsTotal = &Desc{Name: "tcp_connect_seconds_total", Kind: Counter,
		Help: "Time outbound handshakes took, summed (with tcp_active_opens_seen_total: the mean connect latency)."}
	TCPResetsSentTotal = &Desc{Name: "tcp_resets_sent_total", Kind: Counter,
		Help: "Resets sent by the target's namespace, by the kernel's reason (eBPF tcp_send_reset, enum sk_rst_reason: no_socket is a closed port, tcp_abort_on_* the application) and by local port (the connection's, or the one a segment that reached no socket was sent to), for the maxResetPorts busiest ports; the others are port=\"other\"."}
)

// The sched probe (probes/sched.go). Per-thread series carry the labels
// tid and thread (the thread's name); there are at most
// SchedOptions.MaxThreads of each.
var (
	ThreadCPUSecondsTotal = &Desc{Name: "thread_cpu_seconds_total", Kind: Counter,
		Help: "Time the thread ran on a CPU (eBPF sched_switch)."}
	ThreadRunqWaitSecondsTotal = &Desc{Name: "thread_runq_wait_seconds_total", Kind: Counter,
		Help: "Time the thread was runnable but waited for a CPU (run-queue latency, summed)."}
	ThreadRunqWaitsTotal = &Desc{Name: "thread_runq_waits_total", Kind: Counter,
		Help: "Times the thread waited on the run queue; with thread_runq_wait_seconds_total gives the mean wait."}
	ThreadVoluntarySwitchesTotal = &Desc{Name: "thread_voluntary_switches_total", Kind: Counter,
		Help: "Times the thread went off-CPU to sleep (a blocking call or an idle wait)."}
	ThreadInvoluntarySwitchesTotal = &Desc{Name: "thread_involuntary_switches_total", Kind: Counter,
		Help: "Times the thread was preempted while it still had work."}
	ThreadOffCPUSecondsTotal = &Desc{Name: "thread_offcpu_seconds_total", Kind: Counter,
		Help: "Time the thread slept off-CPU (finished sleeps)."}
	ThreadBlockedSeconds = &Desc{Name: "thread_blocked_seconds", Kind: Gauge,
		Help: "How long the thread has been asleep off-CPU now (0 when it is running or runnable)."}
	ThreadBusySeconds = &Desc{Name: "thread_busy_seconds", Kind: Gauge,
		Help: "How long the thread has run (or waited for a CPU) without sleeping longer than sched.busy_gap, now (0 when asleep)."}
	ThreadLongBlocksTotal = &Desc{Name: "thread_long_blocks_total", Kind: Counter,
		Help: "Sleeps of the thread longer than sched.min_block."}
	ProcessRunqWaitSecondsTotal = &Desc{Name: "process_runq_wait_seconds_total", Kind: Counter,
		Help: "Total run-queue wait of the target's threads (time runnable but not running)."}
	ProcessRunqWaitsTotal = &Desc{Name: "process_runq_waits_total", Kind: Counter,
		Help: "Run-queue waits of the target's threads."}
	ProcessRunqLatencyP50Seconds = &Desc{Name: "process_runq_latency_p50_seconds", Kind: Gauge,
		Help: "Median run-queue latency of the target's threads since the last poll (upper bound of its log2 bucket)."}
	ProcessRunqLatencyP99Seconds = &Desc{Name: "process_runq_latency_p99_seconds", Kind: Gauge,
		Help: "99th percentile run-queue latency of the target's threads since the last poll (upper bound of its log2 bucket)."}
)

// The procsignals probe (probes/procsignals.go): signals sent to the target.
var (
	ProcessSignalsTotal = &Desc{Name: "process_signals_total", Kind: Counter,
		Help: "Termination signals (SIGTERM, SIGINT, SIGQUIT) sent to the target (eBPF signal_generate)."}
	ProcessLastSignalTimestampSeconds = &Desc{Name: "process_last_signal_timestamp_seconds", Kind: Gauge,
		Help: "When the target last received the signal (Unix time), and from which process (sender)."}
)

// The CPU profiler (probes/cpuprofile.go).
var (
	ProfileCPUSamplesTotal = &Desc{Name: "profile_cpu_samples_total", Kind: Counter,
		Help: "CPU samples of the target taken by the profiler (software CPU clock)."}
	ProfileCPUSamplesLostTotal = &Desc{Name: "profile_cpu_samples_lost_total", Kind: Counter,
		Help: "CPU samples not counted: reason map_full (profiling.max_stacks too small) or no_stack."}
	ProfileCPUSamplesUnwoundTotal = &Desc{Name: "profile_cpu_samples_unwound_total", Kind: Counter,
		Help: "CPU samples whose user stack was unwound from a copy of the stack (CFI, and frame pointers through JIT code) rather than by frame pointers alone."}
	ProfileCPUUnwindSecondsTotal = &Desc{Name: "profile_cpu_unwind_seconds_total", Kind: Counter,
		Help: "Time the agent spent unwinding the CPU samples' stack copies."}
	ProfileCPUStackCopiesLostTotal = &Desc{Name: "profile_cpu_stack_copies_lost_total", Kind: Counter,
		Help: "CPU samples counted by their frame-pointer walk alone: reason ring_full (the ring buffer had no room for the stack copy) or too_many_stacks (more distinct stacks in one drain than profiling.max_stacks)."}
)

// The OTLP receiver (traces/receiver.go).
var (
	OTLPRequestsTotal = &Desc{Name: "otlp_requests_total", Kind: Counter,
		Help: "OTLP export requests received, by transport (grpc, http), signal (traces, metrics, logs) and result (ok, partial, dropped: metrics or logs with no forward endpoint, malformed, too_large, unsupported, busy: the in-flight budget was taken, timeout: the body did not arrive in time)."}
	OTLPSpansReceivedTotal = &Desc{Name: "otlp_spans_received_total", Kind: Counter,
		Help: "Spans accepted from OTLP exports."}
	OTLPSpansRejectedTotal = &Desc{Name: "otlp_spans_rejected_total", Kind: Counter,
		Help: "Spans rejected from OTLP exports (invalid ids or times)."}
	OTLPSpanStringsTruncatedTotal = &Desc{Name: "otlp_span_strings_truncated_total", Kind: Counter,
		Help: "Span strings (name, route, service, peer, database) cut to traces.max_string_bytes."}
	OTLPSpansEvictedTotal = &Desc{Name: "otlp_spans_evicted_total", Kind: Counter,
		Help: "Spans let go by the span store, by reason: count (traces.max_spans), bytes (traces.max_span_bytes), too_large (one span over the whole store)."}
	OTLPSpanStoreBytes = &Desc{Name: "otlp_span_store_bytes", Kind: Gauge,
		Help: "Bytes of spans held (at most traces.max_span_bytes)."}
	OTLPSpanStoreSpans = &Desc{Name: "otlp_span_store_spans", Kind: Gauge,
		Help: "Spans held (at most traces.max_spans)."}
	OTLPInflightBytes = &Desc{Name: "otlp_inflight_bytes", Kind: Gauge,
		Help: "Bytes held for OTLP requests being read and decoded (at most traces.max_inflight_bytes)."}
	OTLPConnectionsClosedTotal = &Desc{Name: "otlp_connections_closed_total", Kind: Counter,
		Help: "OTLP connections closed at traces.max_connections, by transport and reason (evicted: an idle or silent connection closed for a new one; refused: every connection was busy)."}
)

// The OTLP forwarder (traces/forward.go).
var (
	OTLPForwardedRequestsTotal = &Desc{Name: "otlp_forwarded_requests_total", Kind: Counter,
		Help: "Export requests forwarded to traces.forward_endpoint, by signal (traces, metrics, logs) and result (ok, error, dropped: the queue was full)."}
	OTLPForwardQueueBytes = &Desc{Name: "otlp_forward_queue_bytes", Kind: Gauge,
		Help: "Bytes of export requests waiting to be forwarded (at most traces.forward_queue_bytes)."}
)

// The OTLP logs exporter of findings (exporters/otellogs.go).
var (
	FindingsExported = &Desc{Name: "findings_exported", Kind: Counter,
		Help: "Finding events exported as OTLP log records (findings.otlp_endpoint), by result: exported; failed (refused by the collector, or not delivered within findings.otlp_timeout, retries included); dropped (a record larger than findings.otlp_queue_bytes, or still unsent when the agent stopped); lost (left the journal, findings.history, before the exporter read it)."}
	FindingsExportQueue = &Desc{Name: "findings_export_queue", Kind: Gauge,
		Help: "Finding log records queued or being exported (at most findings.otlp_queue); events beyond wait in the journal."}
	FindingsExportQueueBytes = &Desc{Name: "findings_export_queue_bytes", Kind: Gauge,
		Help: "Estimated bytes of finding log records queued or being exported (at most findings.otlp_queue_bytes)."}
)

// The agent (agent/agent.go), for every collector it runs, labelled with
// the collector.
var (
	CollectorDurationSeconds = &Desc{Name: "collector_duration_seconds", Kind: Gauge,
		Help: "How long the collector's last run took."}
	CollectorSuccess = &Desc{Name: "collector_success", Kind: Gauge,
		Help: "1 if the collector's last run succeeded."}
)
