// rustworker is a Rust process shaped like a Tokio service: two worker
// threads named as Tokio names them ("tokio-runtime-w"), and a main thread
// that waits on its stdin. Worker 0 misbehaves as the first argument says:
//
//   block MS  calls save_session, which blocks in libc's usleep for MS ms, in a loop
//   spin      runs checksum without ever yielding
//   idle      nothing (both workers park, as idle Tokio workers do)
//
// It prints "PID SAVE_SESSION_ADDR PROCESS_ID_ADDR" so that a test can check
// symbolization of its own function (legacy mangling) and of one from std
// (v0 mangling), and exits when stdin is closed.
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;

extern "C" {
    fn usleep(usec: u32) -> i32;
}

static SAVED: AtomicU64 = AtomicU64::new(0);

#[inline(never)]
pub fn save_session(ms: u64) {
    // Stands for a synchronous C library call on the worker (a database
    // driver, fsync): it calls libc directly, and libc has no frame
    // pointers, so only unwinding by .eh_frame finds this function.
    unsafe {
        usleep((ms * 1000) as u32);
    }
    // Work after the call, so that the call is not a tail call (which
    // would leave no frame of this function to find).
    SAVED.fetch_add(1, Ordering::Relaxed);
}

#[inline(never)]
pub fn checksum(data: &[u8], rounds: u32) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for _ in 0..rounds {
        for &b in data {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
    }
    h
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_else(|| "idle".to_string());
    let ms: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(700);

    for i in 0..2 {
        let mode = mode.clone();
        thread::Builder::new()
            .name("tokio-runtime-w".into())
            .spawn(move || {
                if i == 0 && mode == "block" {
                    loop {
                        save_session(ms);
                    }
                }
                if i == 0 && mode == "spin" {
                    // The input changes and the result is kept, so the
                    // call can be neither hoisted nor dropped (without
                    // std::hint::black_box, which Debian's rustc 1.63
                    // lacks).
                    let mut data = vec![7u8; 4096];
                    loop {
                        data[0] = data[0].wrapping_add(1);
                        SAVED.store(checksum(&data, 1000), Ordering::Relaxed);
                    }
                }
                loop {
                    thread::park();
                }
            })
            .expect("spawn worker");
    }

    let process_id: fn() -> u32 = std::process::id;
    let save: fn(u64) = save_session;
    println!("{} {:#x} {:#x}", std::process::id(), save as usize, process_id as usize);
    std::io::stdout().flush().expect("flush stdout");

    let stdin = std::io::stdin();
    let mut line = String::new();
    while stdin.lock().read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
        line.clear();
    }
}
