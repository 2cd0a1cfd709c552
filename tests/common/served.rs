//! `mpc-gateway serve` as a child process: started on a config, its bound addresses read
//! from its JSON log, signalled like an operator would, killed on drop if still running;
//! and [`BackgroundSim`], a Plivo simulator such a process can reach from synchronous tests.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mpc_gateway::simulator::{Simulator, SimulatorConfig};

pub const BIN: &str = env!("CARGO_BIN_EXE_mpc-gateway");

/// A Plivo simulator (plain HTTP on loopback) serving from a runtime of its own, for tests
/// that are synchronous because the gateway under test is a child process.
pub struct BackgroundSim {
    pub sim: Simulator,
    _runtime: tokio::runtime::Runtime,
}

impl BackgroundSim {
    pub fn start(config: SimulatorConfig, worker_threads: usize) -> BackgroundSim {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads)
            .enable_all()
            .build()
            .expect("runtime");
        let sim = runtime
            .block_on(Simulator::start(config))
            .expect("simulator");
        BackgroundSim {
            sim,
            _runtime: runtime,
        }
    }

    pub fn base_url(&self) -> String {
        self.sim.base_url()
    }
}

pub struct Served {
    pub child: Child,
    pub local: SocketAddr,
    pub admin: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Served {
    /// Spawns `serve --config CONFIG` (JSON logs expected) and waits, at most 15 s, for
    /// the line that names both listeners.
    pub fn start(config: &Path) -> Served {
        let mut command = Command::new(BIN);
        command.args(["serve", "--config", config.to_str().expect("UTF-8 path")]);
        Served::spawn(command)
    }

    /// Like [`Served::start`], with these variables set in the child's environment only
    /// (never in the test process, whose environment all tests share).
    pub fn start_with_env(config: &Path, vars: &[(&str, &str)]) -> Served {
        let mut command = Command::new(BIN);
        command.args(["serve", "--config", config.to_str().expect("UTF-8 path")]);
        command.envs(vars.iter().copied());
        Served::spawn(command)
    }

    /// Like [`Served::start`], with the process's umask set to `umask` (octal, e.g.
    /// `"000"`) first, so that a test sees the modes the gateway asks for rather than
    /// what the test runner's umask happens to leave of them. `sh` execs the gateway, so
    /// the pid is the gateway's.
    pub fn start_with_umask(config: &Path, umask: &str) -> Served {
        Served::start_after(config, &format!("umask {umask}"))
    }

    /// Like [`Served::start`], after the shell command `prelude` (e.g. `ulimit -c
    /// unlimited`) has changed what the process inherits. `sh` execs the gateway, so the
    /// pid is the gateway's.
    pub fn start_after(config: &Path, prelude: &str) -> Served {
        let mut command = Command::new("sh");
        command.args([
            "-c",
            &format!("{prelude} && exec \"$0\" serve --config \"$1\""),
            BIN,
            config.to_str().expect("UTF-8 path"),
        ]);
        Served::spawn(command)
    }

    fn spawn(mut command: Command) -> Served {
        let mut child = command
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn serve");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (lines_tx, lines): (_, Receiver<String>) = mpsc::channel();
        let kept = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                kept.lock().expect("log").push(line.clone());
                let _ = lines_tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(15);
        let (local, admin) = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = lines.recv_timeout(left) else {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "serve did not log its addresses within 15 s; log:\n{}",
                    log.lock().expect("log").join("\n")
                );
            };
            if let Some(addresses) = listening_addresses(&line) {
                break addresses;
            }
        };
        Served {
            child,
            local,
            admin,
            log,
        }
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// `kill -NAME pid`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits for the exit (bounded; killed after `within`) and returns the status.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        match wait_bounded(&mut self.child, within) {
            Some(status) => status,
            None => panic!(
                "serve did not exit within {within:?}; log:\n{}",
                self.log_text()
            ),
        }
    }

    /// SIGKILL, then reap.
    pub fn kill_hard(&mut self) -> ExitStatus {
        self.signal("KILL");
        self.wait_exit(Duration::from_secs(20))
    }

    pub fn log_text(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `local_addr` and `admin_addr` of the "mpc-gateway listening" log line.
fn listening_addresses(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let field = |name: &str| {
        value[name]
            .as_str()
            .or_else(|| value["fields"][name].as_str())
            .and_then(|a| a.parse::<SocketAddr>().ok())
    };
    Some((field("local_addr")?, field("admin_addr")?))
}

/// Waits for a child to exit; kills it and returns `None` after `within`.
pub fn wait_bounded(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
