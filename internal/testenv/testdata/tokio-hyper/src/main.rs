//! A real Tokio 1.24 multi-thread runtime serving HTTP/1.1 with hyper 0.14:
//! the shape of a production Rust web service, with one route per fault
//! culprit must tell apart.
//!
//! Routes:
//!
//!   /              answers at once
//!   /block?ms=N    load_user_sync: std::thread::sleep for N ms *on the async
//!                  worker* (a blocking call on a worker: every task queued on
//!                  that worker waits)
//!   /spin?ms=N     compute_digest: N ms of CPU on the worker without yielding
//!   /offload?ms=N  load_user_sync inside tokio::task::spawn_blocking: the same
//!                  sleep on the blocking pool, the right fix. Tokio 1.24 names
//!                  the blocking pool's threads "tokio-runtime-worker" like its
//!                  workers, so a thread name alone cannot tell them apart.
//!
//! Every answer carries the thread that did the work in X-Thread-Id and
//! X-Thread-Name. Usage: tokio-hyper [--port N] [--workers N]; it prints
//! "listening PORT" once it accepts connections.
//!
//! It builds with Debian 12's rustc 1.63 as well as a current one: no newer
//! language or std features (std::hint::black_box came in 1.66).

use std::convert::Infallible;
use std::io::Write;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyper::service::{make_service_fn, service_fn};
use hyper::{Body, Request, Response, Server, StatusCode};

/// How many times load_user_sync ran: written after each sleep, so the sleep
/// is not a tail call (a tail call leaves no frame of load_user_sync on the
/// stack while the thread sleeps, and no unwinder could name it).
static LOADS: AtomicU64 = AtomicU64::new(0);

/// Sink for compute_digest's result, so the optimizer keeps the work.
static DIGEST: AtomicU64 = AtomicU64::new(0);

/// A synchronous "database" call: it sleeps in the kernel for ms.
#[inline(never)]
fn load_user_sync(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    LOADS.fetch_add(1, Ordering::Relaxed) + 1
}

/// CPU work for ms without yielding: an FNV-style digest, checking the clock
/// (vDSO, no system call) every few thousand rounds.
#[inline(never)]
fn compute_digest(ms: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_millis(ms);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut rounds: u64 = 0;
    loop {
        for i in 0..4096u64 {
            h ^= i.wrapping_add(rounds);
            h = h.wrapping_mul(0x0000_0100_0000_01b3).rotate_left(5);
        }
        rounds += 1;
        if Instant::now() >= deadline {
            break;
        }
    }
    DIGEST.fetch_xor(h, Ordering::Relaxed);
    h
}

/// The calling thread's kernel id and name.
fn this_thread() -> (i64, String) {
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as i64;
    let name = std::thread::current().name().unwrap_or("").to_string();
    (tid, name)
}

/// The ms=N query parameter, 0 when absent; capped at a minute so a typo
/// cannot hang a test.
fn query_ms(query: Option<&str>) -> Result<u64, String> {
    for pair in query.unwrap_or("").split('&') {
        if let Some(v) = pair.strip_prefix("ms=") {
            return match v.parse::<u64>() {
                Ok(ms) if ms <= 60_000 => Ok(ms),
                _ => Err(format!("ms must be 0..60000, got {:?}", v)),
            };
        }
    }
    Ok(0)
}

fn answer(status: StatusCode, body: String, thread: Option<(i64, String)>) -> Response<Body> {
    let mut b = Response::builder().status(status).header("content-type", "text/plain");
    if let Some((tid, name)) = thread {
        b = b.header("x-thread-id", tid.to_string()).header("x-thread-name", name);
    }
    match b.body(Body::from(body)) {
        Ok(r) => r,
        // Only a bad header value makes the builder fail; answer without them.
        Err(e) => Response::new(Body::from(format!("response: {}\n", e))),
    }
}

async fn handle(req: Request<Body>) -> Result<Response<Body>, Infallible> {
    let ms = match query_ms(req.uri().query()) {
        Ok(ms) => ms,
        Err(e) => return Ok(answer(StatusCode::BAD_REQUEST, e + "\n", None)),
    };
    let res = match req.uri().path() {
        "/" => answer(StatusCode::OK, "ok\n".to_string(), Some(this_thread())),
        "/block" => {
            let n = load_user_sync(ms);
            answer(StatusCode::OK, format!("blocked {} ms (load {})\n", ms, n), Some(this_thread()))
        }
        "/spin" => {
            let d = compute_digest(ms);
            answer(StatusCode::OK, format!("digest {:016x} after {} ms\n", d, ms), Some(this_thread()))
        }
        "/offload" => match tokio::task::spawn_blocking(move || (load_user_sync(ms), this_thread())).await {
            Ok((n, thread)) => answer(StatusCode::OK, format!("offloaded {} ms (load {})\n", ms, n), Some(thread)),
            Err(e) => answer(StatusCode::INTERNAL_SERVER_ERROR, format!("blocking task: {}\n", e), None),
        },
        _ => answer(StatusCode::NOT_FOUND, "no such route\n".to_string(), None),
    };
    Ok(res)
}

struct Args {
    port: u16,
    workers: Option<usize>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args { port: 0, workers: None };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{} needs a value", flag))?;
        match flag.as_str() {
            "--port" => a.port = v.parse().map_err(|e| format!("--port {:?}: {}", v, e))?,
            "--workers" => a.workers = Some(v.parse().map_err(|e| format!("--workers {:?}: {}", v, e))?),
            _ => return Err(format!("unknown flag {:?} (usage: tokio-hyper [--port N] [--workers N])", flag)),
        }
    }
    Ok(a)
}

async fn serve(listener: TcpListener) -> Result<(), String> {
    let port = listener.local_addr().map_err(|e| format!("local address: {}", e))?.port();
    let server = Server::from_tcp(listener)
        .map_err(|e| format!("serve: {}", e))?
        .serve(make_service_fn(|_conn| async { Ok::<_, Infallible>(service_fn(handle)) }));
    println!("listening {}", port);
    let _ = std::io::stdout().flush();
    server.await.map_err(|e| format!("server: {}", e))
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    // Tokio's defaults otherwise: one worker per CPU, threads named
    // "tokio-runtime-worker". The accept loop runs in block_on on the main
    // thread, as #[tokio::main] would run it; each connection is a task on
    // the workers.
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = args.workers {
        builder.worker_threads(n);
    }
    let rt = builder.build().map_err(|e| format!("runtime: {}", e))?;
    let listener = TcpListener::bind(("127.0.0.1", args.port)).map_err(|e| format!("bind 127.0.0.1:{}: {}", args.port, e))?;
    listener.set_nonblocking(true).map_err(|e| format!("nonblocking: {}", e))?;
    rt.block_on(serve(listener))
}

fn main() {
    if let Err(e) = run() {
        eprintln!("tokio-hyper: {}", e);
        std::process::exit(1);
    }
}
