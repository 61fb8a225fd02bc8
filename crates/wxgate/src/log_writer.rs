//! Log output for `serve`: lines gathered in memory and written to stderr together.
//!
//! Every push logs one line at info. Written one by one, that is a system call per push,
//! 1.5–2.5 µs of the server's CPU (measured under wrk, info against warn). Info and debug
//! lines go into a buffer that a thread writes out every [`INTERVAL`]; a warning or an
//! error is written at once, after everything before it, so that what goes wrong is
//! never late. A buffer that grows past [`LIMIT`] (stderr blocked, or a flood) is written
//! by the line that fills it, so memory stays bounded. The guard returned by
//! [`Buffered::install`] writes out what is left when it is dropped, and a panic does so
//! before it reports.
//!
//! What a `SIGKILL` can cost: the info lines of the last [`INTERVAL`]. A reader of stderr
//! that stops reading stops the server once the pipe and the buffer are full, as it would
//! with unbuffered stderr.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// How often buffered lines are written out.
pub const INTERVAL: Duration = Duration::from_millis(25);
/// Buffered bytes past which the next line writes everything out itself.
pub const LIMIT: usize = 256 * 1024;

/// The writer handed to `tracing_subscriber::fmt()`; cheap to clone.
#[derive(Clone)]
pub struct Buffered {
    shared: Arc<Shared>,
}

struct Shared {
    pending: Mutex<Vec<u8>>,
    /// Held while a batch is taken and written, so that batches keep their order; with
    /// the emptied buffer of the last batch, swapped in for the next one.
    output: Mutex<(Box<dyn Write + Send>, Vec<u8>)>,
    limit: usize,
    /// No thread writes out (it stopped, or never started): every line is written at once.
    direct: AtomicBool,
}

/// Writes out what is buffered when dropped; also stops the writing thread.
pub struct FlushGuard {
    writer: Buffered,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Buffered {
    /// A buffered writer to `output`, written out every `interval` by a thread of its own.
    pub fn new(
        output: Box<dyn Write + Send>,
        interval: Duration,
        limit: usize,
    ) -> (Buffered, FlushGuard) {
        let writer = Buffered {
            shared: Arc::new(Shared {
                pending: Mutex::new(Vec::with_capacity(64 * 1024)),
                output: Mutex::new((output, Vec::with_capacity(64 * 1024))),
                limit,
                direct: AtomicBool::new(false),
            }),
        };
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let for_thread = writer.clone();
        let thread = std::thread::Builder::new()
            .name("wxgate-log".into())
            .spawn(move || {
                // Ends when the guard drops its sender (or sends).
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(interval)
                {
                    for_thread.flush();
                }
            })
            .ok();
        if thread.is_none() {
            writer.shared.direct.store(true, Ordering::Relaxed);
        }
        let guard = FlushGuard { writer: writer.clone(), stop: Some(stop), thread };
        (writer, guard)
    }

    /// The writer for stderr, with a panic hook that writes out the buffer first.
    pub fn install() -> (Buffered, FlushGuard) {
        let (writer, guard) = Buffered::new(Box::new(std::io::stderr()), INTERVAL, LIMIT);
        let on_panic = writer.clone();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            on_panic.flush();
            previous(info);
        }));
        (writer, guard)
    }

    /// Writes out everything buffered so far.
    pub fn flush(&self) {
        let mut guard = lock(&self.shared.output);
        let (output, spare) = &mut *guard;
        std::mem::swap(spare, &mut *lock(&self.shared.pending));
        if !spare.is_empty() {
            // Nowhere to report a failed write to stderr; the lines are dropped.
            let _ = output.write_all(spare);
            let _ = output.flush();
            spare.clear();
        }
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // Lines logged from now on (while the runtime shuts down) go out at once.
        self.writer.shared.direct.store(true, Ordering::Relaxed);
        self.writer.flush();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One log line on its way into the buffer.
pub struct Line<'a> {
    writer: &'a Buffered,
    urgent: bool,
}

impl Write for Line<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        lock(&self.writer.shared.pending).extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line<'_> {
    fn drop(&mut self) {
        let shared = &self.writer.shared;
        let full = || lock(&shared.pending).len() >= shared.limit;
        if self.urgent || shared.direct.load(Ordering::Relaxed) || full() {
            self.writer.flush();
        }
    }
}

impl<'a> MakeWriter<'a> for Buffered {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line { writer: self, urgent: true }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line<'a> {
        // Levels compare by verbosity: WARN and ERROR are the ones at or below WARN.
        Line { writer: self, urgent: *meta.level() <= Level::WARN }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn subscriber(writer: Buffered) -> impl tracing::Subscriber {
        tracing_subscriber::fmt()
            .with_writer(writer)
            .with_ansi(false)
            .without_time()
            .with_max_level(Level::DEBUG)
            .finish()
    }

    #[test]
    fn info_waits_for_the_interval_and_a_warning_writes_everything_in_order() {
        let sink = Sink::default();
        // An interval no test waits for: only a warning, the limit or the guard write.
        let (writer, guard) =
            Buffered::new(Box::new(sink.clone()), Duration::from_secs(3600), LIMIT);
        tracing::subscriber::with_default(subscriber(writer), || {
            tracing::info!("first");
            tracing::debug!("second");
            assert_eq!(sink.text(), "", "info and debug lines are buffered");
            tracing::warn!("third");
        });
        let text = sink.text();
        let order: Vec<_> = ["first", "second", "third"].iter().map(|w| text.find(w)).collect();
        assert!(order.iter().all(Option::is_some), "all written by the warning: {text}");
        assert!(order.windows(2).all(|w| w[0] < w[1]), "in order: {text}");
        drop(guard);
    }

    #[test]
    fn lines_after_the_guard_is_dropped_are_written_at_once() {
        let sink = Sink::default();
        let (writer, guard) =
            Buffered::new(Box::new(sink.clone()), Duration::from_secs(3600), LIMIT);
        drop(guard);
        tracing::subscriber::with_default(subscriber(writer), || tracing::info!("late"));
        assert!(sink.text().contains("late"), "{}", sink.text());
    }

    #[test]
    fn the_thread_writes_buffered_lines_out() {
        let sink = Sink::default();
        let (writer, _guard) =
            Buffered::new(Box::new(sink.clone()), Duration::from_millis(5), LIMIT);
        tracing::subscriber::with_default(subscriber(writer), || tracing::info!("queued"));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !sink.text().contains("queued") {
            assert!(std::time::Instant::now() < deadline, "never written out");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_full_buffer_is_written_by_the_line_that_fills_it_and_the_guard_writes_the_rest() {
        let sink = Sink::default();
        let (writer, guard) =
            Buffered::new(Box::new(sink.clone()), Duration::from_secs(3600), 1000);
        tracing::subscriber::with_default(subscriber(writer.clone()), || {
            for i in 0..100 {
                tracing::info!(i, "line");
            }
        });
        let written = sink.text().lines().count();
        assert!(written >= 50, "the limit wrote most lines out: {written}");
        assert!(lock(&writer.shared.pending).len() < 1000, "the buffer stays under its limit");
        drop(guard);
        assert_eq!(sink.text().lines().count(), 100, "the guard wrote the rest");
    }
}
