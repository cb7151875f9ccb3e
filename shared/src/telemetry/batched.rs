//! Log lines gathered in memory and written to stdout in batches by a thread of their own, for
//! the fleet's long-running processes (api, worker, scheduler).
//!
//! Written straight to stdout, every log line is a `write` system call on the thread that
//! logged it: a worker logs about seven lines per job, the api one per accepted job, and under
//! load those calls were 3% of the worker's CPU (`docs/benchmarks.md`, cut 20). Here a line is
//! copied into a buffer under a lock, and the writer thread wakes when a line arrives after a
//! quiet spell, lets lines gather for [`BATCH_WINDOW`], and writes them all with one call: a
//! line reaches stdout at most that long after it was logged.
//!
//! Bounded: when stdout cannot keep up (a full disk, a reader that stopped), at most
//! [`MAX_BUFFERED`] bytes wait; lines past that are dropped, counted, and said so in a line of
//! their own once stdout takes lines again, so a stuck log never stalls a job. The buffered
//! lines are written when the [`Flusher`] is dropped (the process ends, an error included);
//! a process killed outright loses at most the last window's lines.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long lines gather before they are written: the most a line waits.
pub const BATCH_WINDOW: Duration = Duration::from_millis(50);
/// The most bytes of lines waiting; past it lines are dropped and counted.
pub const MAX_BUFFERED: usize = 4 << 20;
/// Bytes of waiting lines that cut the window short.
const EARLY_WRITE: usize = 256 << 10;
/// How long a stopping process waits for its last lines to be written.
const FINAL_WRITE_GRACE: Duration = Duration::from_secs(2);

#[derive(Default)]
struct State {
    lines: Vec<u8>,
    /// Lines dropped since the last write, for lack of room.
    dropped: u64,
    /// The writer thread waits for a first line (a line must wake it).
    idle: bool,
    closing: bool,
    /// Where the lines logged after the writer thread has written everything and stopped go,
    /// one write each: the thread's `out` (`Some` once it has stopped).
    after: Option<Box<dyn Write + Send>>,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the writer thread (a line after a quiet spell, a full window, the end).
    wake: Condvar,
    /// Tells the stopping process the last lines are written.
    finished: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves bytes, not a broken invariant.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Where the log layer writes: cheap to clone, one per process.
#[derive(Clone)]
pub struct BatchedWriter {
    shared: Arc<Shared>,
}

/// Writes what is left when dropped, and stops the writer thread.
pub struct Flusher {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A writer of batches to `out` (stdout in the processes), with the thread that writes them.
pub fn spawn<W: Write + Send + 'static>(out: W) -> std::io::Result<(BatchedWriter, Flusher)> {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        wake: Condvar::new(),
        finished: Condvar::new(),
    });
    let thread = std::thread::Builder::new()
        .name("pictor-log".to_string())
        .spawn({
            let shared = Arc::clone(&shared);
            move || write_batches(&shared, out)
        })?;
    Ok((
        BatchedWriter {
            shared: Arc::clone(&shared),
        },
        Flusher {
            shared,
            thread: Some(thread),
        },
    ))
}

fn write_batches<W: Write + Send + 'static>(shared: &Shared, mut out: W) {
    let mut batch = Vec::new();
    loop {
        let mut state = shared.lock();
        while state.lines.is_empty() && state.dropped == 0 && !state.closing {
            state.idle = true;
            state = shared
                .wake
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.idle = false;
        if !state.closing && state.lines.len() < EARLY_WRITE {
            // Let the lines of this window gather: one write for all of them.
            state = shared
                .wake
                .wait_timeout_while(state, BATCH_WINDOW, |state| {
                    !state.closing && state.lines.len() < EARLY_WRITE
                })
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        std::mem::swap(&mut batch, &mut state.lines);
        let dropped = std::mem::take(&mut state.dropped);
        let closing = state.closing;
        drop(state);
        // A failed write loses this batch, as an unbuffered line would have been lost.
        let _ = out.write_all(&batch);
        if dropped > 0 {
            let _ = writeln!(
                out,
                "{} WARN {dropped} log lines were dropped: stdout did not keep up",
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            );
        }
        let _ = out.flush();
        batch.clear();
        // The buffer's memory is kept for the next batch, unless a burst made it large.
        batch.shrink_to(EARLY_WRITE);
        if closing {
            let mut state = shared.lock();
            if state.lines.is_empty() {
                state.after = Some(Box::new(out));
                shared.finished.notify_all();
                return;
            }
        }
    }
}

impl BatchedWriter {
    fn push(&self, line: &[u8]) {
        let mut state = self.shared.lock();
        if let Some(out) = &mut state.after {
            // The process is ending and its writer thread has stopped.
            let _ = out.write_all(line);
            return;
        }
        if state.lines.len() + line.len() > MAX_BUFFERED {
            state.dropped += 1;
            return;
        }
        state.lines.extend_from_slice(line);
        if state.idle || state.lines.len() >= EARLY_WRITE {
            state.idle = false;
            self.shared.wake.notify_one();
        }
    }
}

impl Write for BatchedWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        self.push(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchedWriter {
    type Writer = BatchedWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.closing = true;
        self.shared.wake.notify_one();
        // A stdout that never takes the last lines must not keep the process from ending.
        let (state, waited) = self
            .shared
            .finished
            .wait_timeout_while(state, FINAL_WRITE_GRACE, |state| state.after.is_none())
            .unwrap_or_else(PoisonError::into_inner);
        drop(state);
        if !waited.timed_out()
            && let Some(thread) = self.thread.take()
        {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// An `out` that keeps what it was given, each write apart, and can be made to hang.
    #[derive(Clone, Default)]
    struct Recorder {
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
        stuck: Arc<Mutex<bool>>,
    }

    impl Write for Recorder {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            while *self.stuck.lock().unwrap() {
                std::thread::sleep(Duration::from_millis(5));
            }
            self.writes.lock().unwrap().push(bytes.to_vec());
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Recorder {
        fn text(&self) -> String {
            String::from_utf8(self.writes.lock().unwrap().concat()).unwrap()
        }

        fn write_calls(&self) -> usize {
            self.writes.lock().unwrap().len()
        }
    }

    fn log(writer: &BatchedWriter, line: &str) {
        writer.make_writer().write_all(line.as_bytes()).unwrap();
    }

    #[test]
    fn lines_logged_together_reach_stdout_in_order_in_one_write_within_the_window() {
        let out = Recorder::default();
        let (writer, _flusher) = spawn(out.clone()).unwrap();
        let logged = Instant::now();
        for n in 0..100 {
            log(&writer, &format!("line {n}\n"));
        }
        while out.text().lines().count() < 100 {
            assert!(
                logged.elapsed() < BATCH_WINDOW * 20,
                "the lines reach stdout soon after the window: {:?}",
                out.text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let expected: String = (0..100).map(|n| format!("line {n}\n")).collect();
        assert_eq!(out.text(), expected);
        assert_eq!(out.write_calls(), 1, "one write for the window's lines");

        // A line after a quiet spell wakes the writer again.
        log(&writer, "later\n");
        let logged = Instant::now();
        while !out.text().ends_with("later\n") {
            assert!(
                logged.elapsed() < BATCH_WINDOW * 20,
                "a later line is written"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn the_flusher_writes_what_is_left_when_the_process_ends() {
        let out = Recorder::default();
        let (writer, flusher) = spawn(out.clone()).unwrap();
        log(&writer, "first\n");
        log(&writer, "last words\n");
        drop(flusher);
        assert_eq!(out.text(), "first\nlast words\n");
        log(&writer, "after the end\n");
        assert_eq!(out.text(), "first\nlast words\nafter the end\n");
    }

    #[test]
    fn a_stuck_stdout_drops_lines_past_the_bound_says_how_many_and_never_blocks_a_logger() {
        let out = Recorder::default();
        *out.stuck.lock().unwrap() = true;
        let (writer, flusher) = spawn(out.clone()).unwrap();
        // The first batch is taken by the writer, which then hangs on the stuck stdout.
        log(&writer, "before\n");
        std::thread::sleep(BATCH_WINDOW * 3);
        let line = format!("{}\n", "x".repeat(1023));
        let lines = MAX_BUFFERED / line.len() + 500;
        let started = Instant::now();
        for _ in 0..lines {
            log(&writer, &line);
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "logging does not wait for stdout"
        );
        *out.stuck.lock().unwrap() = false;
        drop(flusher);
        let text = out.text();
        let kept = text.lines().filter(|line| line.starts_with('x')).count();
        assert_eq!(kept, MAX_BUFFERED / line.len(), "up to the bound is kept");
        assert!(text.starts_with("before\n"), "{}", &text[..20]);
        assert!(
            text.contains(&format!("WARN {} log lines were dropped", lines - kept)),
            "the drop is said: {}",
            text.lines().last().unwrap_or_default()
        );
    }

    #[test]
    fn a_stdout_that_never_takes_the_last_lines_does_not_keep_the_process_from_ending() {
        let out = Recorder::default();
        *out.stuck.lock().unwrap() = true;
        let (writer, flusher) = spawn(out.clone()).unwrap();
        log(&writer, "never written\n");
        let started = Instant::now();
        drop(flusher);
        assert!(started.elapsed() < FINAL_WRITE_GRACE + Duration::from_secs(2));
        *out.stuck.lock().unwrap() = false;
    }
}
