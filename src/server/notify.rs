//! systemd's service notification protocol (`sd_notify(3)`): tells the service manager
//! that `serve` is ready (both listeners bound, audit log open), that a reload started
//! and finished, and that the drain began.
//!
//! Without it a `Type=exec` unit counts as started as soon as the binary runs, before a
//! bind or the audit lock can still fail, and units ordered after it may start too
//! early. With `Type=notify` (or `Type=notify-reload`, systemd 253+, which also makes
//! `systemctl reload` wait for the reload to be applied) the manager waits for
//! `READY=1`. The protocol is one datagram per state change to the socket named by
//! `NOTIFY_SOCKET`: a path, or `@name` for an abstract socket. Outside systemd the
//! variable is unset and nothing is sent.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};

/// Where state changes go, when the process runs under a service manager that asked
/// for them.
pub struct Notifier {
    socket: UnixDatagram,
    to: SocketAddr,
    /// A failed send is logged once: the manager going away is not worth a line per
    /// reload.
    warned: AtomicBool,
}

impl Notifier {
    /// The notifier `NOTIFY_SOCKET` asks for; `None` when it is unset or empty. A value
    /// that names no usable socket is logged and ignored: readiness reporting is a
    /// convenience of the unit, never a reason not to serve.
    pub fn from_env() -> Option<Notifier> {
        let target = std::env::var_os("NOTIFY_SOCKET")?;
        if target.is_empty() {
            return None;
        }
        match Notifier::connect(&target.to_string_lossy()) {
            Ok(notifier) => Some(notifier),
            Err(err) => {
                tracing::warn!(error = %err, "NOTIFY_SOCKET is set but unusable; not reporting readiness to the service manager");
                None
            }
        }
    }

    fn connect(target: &str) -> io::Result<Notifier> {
        let to = socket_address(target)?;
        Ok(Notifier {
            socket: UnixDatagram::unbound()?,
            to,
            warned: AtomicBool::new(false),
        })
    }

    /// Serving: both listeners bound and the audit log open.
    pub fn ready(&self, status: &str) {
        self.send(&format!(
            "READY=1\nSTATUS={}\nMAINPID={}",
            one_line(status),
            std::process::id()
        ));
    }

    /// A SIGHUP reload started. `MONOTONIC_USEC` is what `Type=notify-reload` requires
    /// to tell this reload from an earlier one.
    pub fn reloading(&self) {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let micros = now.tv_sec.saturating_mul(1_000_000) + now.tv_nsec / 1_000;
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={micros}"));
    }

    /// The reload ended, applied or refused; `status` says which (shown by
    /// `systemctl status`), since the protocol has no way to fail a reload.
    pub fn reloaded(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// The drain began.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=draining");
    }

    fn send(&self, message: &str) {
        if let Err(err) = self.socket.send_to_addr(message.as_bytes(), &self.to) {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %err, "could not notify the service manager (NOTIFY_SOCKET)");
            }
        }
    }
}

/// `@name` is an abstract socket (Linux), anything else a filesystem path.
fn socket_address(target: &str) -> io::Result<SocketAddr> {
    match target.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())
        }
        None => SocketAddr::from_pathname(target),
    }
}

/// A `STATUS=` value must stay on its line: a newline would start another assignment.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn listener() -> (tempfile::TempDir, UnixDatagram, Notifier) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let manager = UnixDatagram::bind(&path).expect("bind");
        manager
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let notifier = Notifier::connect(path.to_str().expect("UTF-8")).expect("connect");
        (dir, manager, notifier)
    }

    fn receive(manager: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = manager.recv(&mut buf).expect("a datagram");
        String::from_utf8(buf[..n].to_vec()).expect("UTF-8")
    }

    #[test]
    fn each_state_change_is_one_datagram_of_assignments() {
        let (_dir, manager, notifier) = listener();
        notifier.ready("serving on 127.0.0.1:1\nwith a newline");
        let ready = receive(&manager);
        assert!(ready.starts_with("READY=1\n"), "{ready}");
        assert!(
            ready.contains("\nSTATUS=serving on 127.0.0.1:1 with a newline\n"),
            "{ready}"
        );
        assert!(
            ready.ends_with(&format!("MAINPID={}", std::process::id())),
            "{ready}"
        );

        notifier.reloading();
        let reloading = receive(&manager);
        let micros: u64 = reloading
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{reloading}"));
        assert!(micros > 0);

        notifier.reloaded("reload refused: bad");
        assert_eq!(receive(&manager), "READY=1\nSTATUS=reload refused: bad");
        notifier.stopping();
        assert_eq!(receive(&manager), "STOPPING=1\nSTATUS=draining");
    }

    #[test]
    fn an_abstract_socket_name_is_reached_by_its_at_sign_form() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("mpc-gateway-notify-test-{}", std::process::id());
        let manager = UnixDatagram::bind_addr(
            &SocketAddr::from_abstract_name(name.as_bytes()).expect("name"),
        )
        .expect("bind abstract");
        manager
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let notifier = Notifier::connect(&format!("@{name}")).expect("connect");
        notifier.stopping();
        assert_eq!(receive(&manager), "STOPPING=1\nSTATUS=draining");
    }

    #[test]
    fn a_manager_that_went_away_does_not_stop_the_gateway() {
        let (dir, manager, notifier) = listener();
        drop(manager);
        drop(dir);
        notifier.stopping();
        notifier.stopping();
        assert!(notifier.warned.load(Ordering::Relaxed));
    }
}
