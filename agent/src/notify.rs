//! systemd's notify protocol, by hand (it is one datagram): `READY=1` once
//! the agent serves, `WATCHDOG=1` from the main loop, so a hung loop gets
//! the agent restarted (`Type=notify`, `WatchdogSec=` in the unit).
//!
//! `NOTIFY_SOCKET` is a path, or an abstract socket name starting with `@`.

use std::os::unix::net::UnixDatagram;

/// A connection to systemd's notify socket, if the agent runs under one.
pub struct Notifier {
    socket: UnixDatagram,
}

impl Notifier {
    /// `None` when `NOTIFY_SOCKET` is not set (not under systemd) or unusable.
    pub fn from_env() -> Option<Notifier> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let socket = UnixDatagram::unbound().ok()?;
        let bytes = path.as_encoded_bytes();
        let connected = if let Some(name) = bytes.strip_prefix(b"@") {
            #[cfg(target_os = "linux")]
            {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name).and_then(|a| socket.connect_addr(&a))
            }
            #[cfg(not(target_os = "linux"))]
            {
                let _ = name;
                Err(std::io::Error::other("abstract sockets need Linux"))
            }
        } else {
            socket.connect(&path)
        };
        match connected {
            Ok(()) => Some(Notifier { socket }),
            Err(e) => {
                log::warn!("NOTIFY_SOCKET is set but unusable: {e}");
                None
            }
        }
    }

    fn send(&self, message: &str) {
        if let Err(e) = self.socket.send(message.as_bytes()) {
            log::debug!("sd_notify {message:?}: {e}");
        }
    }

    pub fn ready(&self) {
        self.send("READY=1");
    }

    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    pub fn status(&self, text: &str) {
        self.send(&format!("STATUS={}", text.replace('\n', " ")));
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sends_datagrams_to_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let socket = std::os::unix::net::UnixDatagram::unbound().unwrap();
        socket.connect(&path).unwrap();
        let n = super::Notifier { socket };
        n.ready();
        n.watchdog();
        let mut buf = [0u8; 64];
        let k = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"READY=1");
        let k = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"WATCHDOG=1");
    }
}
