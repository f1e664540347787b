//! What the frontend tests of this crate share: the process's log, as
//! `spindle serve` sets it up, and one test at a time.

use spindle_export::LibraryLogs;
use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use tracing_subscriber::prelude::*;

/// Everything the process logs (the backend's threads included), through
/// the layers `spindle serve` uses.
pub fn log() -> &'static Mutex<Vec<u8>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_writer(move || Sink(sink.clone()))
            .with_ansi(false)
            .finish()
            .with(LibraryLogs::default())
            .try_init()
            .expect("subscriber");
        buf
    })
}

pub struct Sink(Arc<Mutex<Vec<u8>>>);
impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The log lines written since `mark` (a length of the log).
pub fn lines_since(mark: usize) -> Vec<String> {
    let l = log().lock().unwrap();
    String::from_utf8_lossy(&l[mark.min(l.len())..])
        .lines()
        .map(str::to_owned)
        .collect()
}

pub fn mark() -> usize {
    log().lock().unwrap().len()
}

/// The tests share the log and measure CPU time: one at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    static S: Mutex<()> = Mutex::new(());
    S.lock().unwrap_or_else(|e| e.into_inner())
}

/// An export of a raw image holding `data`, in `dir`, serving on
/// `dir/s.sock` from a thread of its own: the device the frontend tests
/// talk to.
pub fn raw_export(
    dir: &std::path::Path,
    name: &str,
    data: &[u8],
    num_queues: u16,
    queue_size: u16,
) -> (
    Arc<spindle_vhost::Export>,
    std::path::PathBuf,
    std::thread::JoinHandle<Result<(), spindle_vhost::Error>>,
) {
    use spindle_block::{open_image, Format, OpenConfig};
    use spindle_export::{Device, DeviceConfig};
    use spindle_vhost::Export;
    let img = dir.join("disk.raw");
    std::fs::write(&img, data).unwrap();
    let cfg = OpenConfig {
        format: Some(Format::Raw),
        ..Default::default()
    };
    let node = open_image(img.to_str().unwrap(), &cfg).unwrap();
    let dev = Arc::new(Device::new(
        node,
        DeviceConfig {
            name: name.into(),
            serial: name.into(),
            num_queues,
            iothreads: 1,
            queue_size,
            poll_ns: 0,
            engine: spindle_io::RuntimeConfig::default(),
            read_only: false,
        },
    ));
    let sock = dir.join("s.sock");
    let export = Export::bind(dev, &sock).unwrap();
    let runner = export.clone();
    let thread = std::thread::spawn(move || runner.run());
    (export, sock, thread)
}
