//! A real mosquitto on a free port, configured like production
//! (`fleet-server/mosquitto/`: password file, the shipped ACL, persistence),
//! that a test can stop and start again on the same port.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::procs::{free_port, tail, wait_for, Proc};

pub const FLEET_USER: &str = "outpost-fleet";
pub const FLEET_PASSWORD: &str = "e2e-fleet-password-0123456789";

pub struct Mosquitto {
    pub port: u16,
    dir: PathBuf,
    proc: Option<Proc>,
}

impl Mosquitto {
    /// `None` when mosquitto is not installed (`scripts/setup.sh` installs
    /// it).
    pub fn start(dir: &Path) -> Option<Mosquitto> {
        if Command::new("mosquitto").arg("-h").output().is_err() {
            return None;
        }
        std::fs::create_dir_all(dir.join("persist")).expect("mosquitto dir");
        let passwd = dir.join("passwd");
        std::fs::write(&passwd, "").expect("passwd");
        let acl = outpost_e2e::repo_root().join("fleet-server/mosquitto/acl");
        let port = free_port();
        let conf = format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\nacl_file {}\nmax_packet_size 1200000\npersistence true\npersistence_location {}/\nmax_queued_messages 100\n",
            passwd.display(),
            acl.display(),
            dir.join("persist").display()
        );
        std::fs::write(dir.join("mosquitto.conf"), conf).expect("conf");
        let mut m = Mosquitto { port, dir: dir.to_path_buf(), proc: None };
        m.add_user(FLEET_USER, FLEET_PASSWORD);
        m.run();
        Some(m)
    }

    /// (Re)starts the process on the same port with the same files.
    pub fn run(&mut self) {
        let mut cmd = Command::new("mosquitto");
        cmd.arg("-c").arg(self.dir.join("mosquitto.conf"));
        self.proc = Some(Proc::spawn(cmd, &self.dir.join("mosquitto.log"), "mosquitto"));
        let port = self.port;
        wait_for(
            "mosquitto to listen",
            Duration::from_secs(10),
            || std::net::TcpStream::connect(("127.0.0.1", port)).ok(),
            || tail(&self.dir.join("mosquitto.log"), 20),
        );
    }

    /// Stops it hard (SIGKILL): every client loses its connection at once.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// Adds a user to the password file and makes mosquitto re-read it
    /// (SIGHUP to this process only).
    pub fn add_user(&mut self, user: &str, password: &str) {
        let out = Command::new("mosquitto_passwd")
            .arg("-b")
            .arg(self.dir.join("passwd"))
            .args([user, password])
            .output()
            .expect("mosquitto_passwd");
        assert!(out.status.success(), "mosquitto_passwd: {}", String::from_utf8_lossy(&out.stderr));
        if let Some(p) = &self.proc {
            p.signal("HUP");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
