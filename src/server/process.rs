//! The `serve` command as a process: loading the config and installing the log
//! subscriber, the tokio runtime the gateway runs on, glibc's malloc trim threshold, and
//! the signals (SIGHUP reloads, SIGTERM/SIGINT drain and exit).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use tokio::task::JoinHandle;

use crate::config::{Config, ConfigError};

use super::notify::Notifier;
use super::{RunningGateway, StartOptions};

/// `mpc-gateway serve`: runs until SIGTERM/SIGINT; SIGHUP reloads.
pub fn run_serve(config_path: PathBuf) -> anyhow::Result<()> {
    // Named like `check-config` names it: a supervisor's log may hold several files' errors.
    let config = Config::load(&config_path)
        .with_context(|| format!("{}: invalid configuration", config_path.display()))?;
    crate::telemetry::init_tracing(&config.log);
    raise_malloc_trim_threshold();
    let runtime = gateway_runtime(config.worker_threads)?;
    let served = runtime.block_on(serve_until_signalled(config, config_path));
    // The audit log is flushed and synced by now. What may still run is a blocking
    // thread inside `getaddrinfo` (an upstream or Redis name lookup), which cannot be
    // cancelled: dropping the runtime would wait for the resolver's own timeouts, past
    // `shutdown_grace`, into the supervisor's SIGKILL.
    runtime.shutdown_timeout(EXIT_WAIT_FOR_BLOCKING);
    // In the operational log too, where a log pipeline (JSON lines) looks for errors; the
    // caller also prints it plainly, for a terminal or a log set to `off`.
    if let Err(err) = &served {
        tracing::error!(error = %crate::causes::one_line(err.chain()), "serve failed");
    }
    served
}

/// How long an exiting gateway waits for blocking threads still at work.
const EXIT_WAIT_FOR_BLOCKING: Duration = Duration::from_millis(250);

/// Stops glibc's malloc from shrinking and regrowing the heap on every upstream answer.
///
/// hyper frees each HTTP/1.1 answer's read buffer (8 KiB) when the answer is dropped,
/// often at the top of the heap; with glibc's initial trim threshold (128 KiB) that
/// returned the top to the kernel and the next read buffer took it back: 0.25 `brk`
/// calls and 0.22 page faults per request, about 5% of the gateway's CPU over an
/// HTTP/1.1 upstream (benches/RESULTS.md, session 4). glibc raises its thresholds by
/// itself once a block it served with `mmap` is freed (mallopt(3), `M_MMAP_THRESHOLD`):
/// to that block's size for `mmap`, twice it for trimming. Freeing one 256 KiB block
/// now sets them to 256 and 512 KiB, so at most 512 KiB freed at the top stay resident.
/// The block is never touched, so it costs no memory; other allocators ignore this.
fn raise_malloc_trim_threshold() {
    drop(std::hint::black_box(Vec::<u8>::with_capacity(256 << 10)));
}

/// How many tasks the gateway's current-thread runtime polls between two looks at its
/// sockets and timers (tokio's default is 61). Under load each look is an `epoll_wait`
/// that lets newly ready callers in between the requests of the turn under way; with
/// 256, more of the requests ready at once go through each stage together, so their
/// upstream frames and audit records share fewer writes. Interleaved benchmark rounds
/// (benches/RESULTS.md, session 11, the simulator unchanged): HTTP/2 upstream 16.5 → 16.0
/// µs of CPU per request and 47.1k → 49.6k requests/s; HTTP/1.1 upstream within the
/// noise; latency at 2,000/s unchanged, since a turn that runs out of ready tasks looks
/// at the sockets at once anyway. A turn of 256 polls takes about a millisecond at
/// saturation (more if it holds TLS handshakes), which is how late a timer or a signal
/// can then be noticed.
const GATEWAY_EVENT_INTERVAL: u32 = 256;

/// The gateway's runtime: [`build_runtime`]'s, with [`GATEWAY_EVENT_INTERVAL`] when it
/// is a current-thread runtime (the only layout it was measured on).
fn gateway_runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = runtime_builder(worker_threads);
    if worker_threads == 1 {
        builder.event_interval(GATEWAY_EVENT_INTERVAL);
    }
    builder.build()
}

/// A runtime with `worker_threads` workers (0 = one per CPU), tokio's defaults otherwise
/// (the demo, and the benchmark's simulator). One worker is the calling thread itself (a
/// current-thread runtime): no work-stealing machinery, no extra thread, and tasks woken
/// in one turn run in order, so their upstream frames and audit records leave together.
pub fn build_runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    runtime_builder(worker_threads).build()
}

fn runtime_builder(worker_threads: usize) -> tokio::runtime::Builder {
    let mut builder = if worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if worker_threads > 1 {
        builder.worker_threads(worker_threads);
    }
    // Blocking threads serve DNS lookups for new upstream connections. With an HTTP/2
    // upstream one connection carries every call, and even over HTTP/1.1 a burst of
    // lookups for the one Plivo host gains nothing from dozens of threads, each of which
    // would stay around (with its memory) for a while after the burst.
    builder.max_blocking_threads(4).enable_all();
    builder
}

async fn serve_until_signalled(config: Config, config_path: PathBuf) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Handlers first: a signal that arrives while the audit log is opened and the
    // listeners bound is then handled once serving (SIGHUP's default action would
    // otherwise kill the process mid-start).
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let running = RunningGateway::start(&config, StartOptions::default()).await?;
    drop(config);
    let manager = Notifier::from_env();
    if let Some(manager) = &manager {
        // READY=1 says the process is up (units ordered after it may start); whether it
        // takes requests is /readyz's, and the status line says so when it does not.
        let readiness = match crate::admin::readiness(running.gateway()) {
            Ok(()) => String::new(),
            Err(why) => format!("; not ready: {why}"),
        };
        manager.ready(&format!(
            "serving on {}, admin on {}{readiness}",
            running.local_addr(),
            running.admin_addr()
        ));
    }
    // The config being read for a reload, on a blocking thread: a file on a hung mount
    // then holds up only that reload, never requests, the admin port or a drain.
    // SIGHUPs that arrive meanwhile wait (tokio keeps one) and start the next reload.
    let mut reading: Option<JoinHandle<Result<Config, ConfigError>>> = None;
    loop {
        tokio::select! {
            _ = hangup.recv(), if reading.is_none() => {
                if let Some(manager) = &manager {
                    manager.reloading();
                }
                let path = config_path.clone();
                reading = Some(tokio::task::spawn_blocking(move || Config::load(&path)));
            }
            read = async { reading.as_mut().expect("guarded").await }, if reading.is_some() => {
                reading = None;
                let status = match read {
                    Ok(loaded) => match running.apply_reload(loaded) {
                        Ok(()) => "serving; configuration reloaded".to_owned(),
                        Err(err) => format!("serving; reload refused, the running configuration stays: {err}"),
                    },
                    Err(err) => {
                        tracing::error!(error = %err, "the config could not be read for a reload; keeping the running configuration");
                        "serving; reload failed, the running configuration stays".to_owned()
                    }
                };
                if let Some(manager) = &manager {
                    manager.reloaded(&status);
                }
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    if reading.is_some() {
        tracing::warn!("a reload was still reading the config; it is abandoned");
    }
    tracing::info!("draining");
    if let Some(manager) = &manager {
        manager.stopping();
    }
    let grace = running.shutdown_grace();
    let drain = running.shutdown();
    tokio::pin!(drain);
    // A second signal does not cut the drain short (that would lose the `result`
    // records of requests Plivo is still answering); say so, rather than look hung.
    loop {
        tokio::select! {
            drained = &mut drain => {
                drained?;
                break;
            }
            _ = terminate.recv() => already_draining(grace),
            _ = interrupt.recv() => already_draining(grace),
        }
    }
    tracing::info!("stopped");
    Ok(())
}

fn already_draining(grace: Duration) {
    tracing::warn!(
        shutdown_grace = %humantime::format_duration(grace),
        "already draining: in-flight requests get up to shutdown_grace from the first signal; SIGKILL stops now but loses the result records of requests still with Plivo"
    );
}
