//! A real mosquitto on a free port, with the ACL shipped in
//! `fleet-server/mosquitto/acl` and a password file made with
//! `mosquitto_passwd`. `start` returns `None` (with a message) when
//! mosquitto is not installed; `scripts/setup.sh` installs it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{eventually, free_port};

pub struct Mosquitto {
    child: Child,
    pub port: u16,
    passwd: std::path::PathBuf,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Mosquitto {
    pub fn start(dir: &Path, fleet_password: &str) -> Option<Mosquitto> {
        if Command::new("mosquitto").arg("-h").output().is_err() {
            eprintln!("mosquitto is not installed; skipping");
            return None;
        }
        let port = free_port();
        let passwd = dir.join("passwd");
        let acl = Path::new(env!("CARGO_MANIFEST_DIR")).join("mosquitto/acl");
        std::fs::write(&passwd, "").expect("passwd");
        let mut m = Mosquitto {
            child: Command::new("true").spawn().expect("placeholder"),
            port,
            passwd: passwd.clone(),
        };
        m.add_user("outpost-fleet", fleet_password);
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\nacl_file {}\npersistence false\nmax_packet_size 1200000\n",
                passwd.display(),
                acl.display()
            ),
        )
        .expect("conf");
        let _ = m.child.wait();
        m.child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("mosquitto.log")).expect("log"))
            .spawn()
            .expect("mosquitto");
        assert!(
            eventually(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()),
            "mosquitto did not start: {}",
            std::fs::read_to_string(dir.join("mosquitto.log")).unwrap_or_default()
        );
        Some(m)
    }

    pub fn add_user(&mut self, user: &str, password: &str) {
        let out = Command::new("mosquitto_passwd").arg("-b").arg(&self.passwd).args([user, password]).output().expect("mosquitto_passwd");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    /// Makes mosquitto re-read its password and ACL files.
    pub fn reload(&self) {
        let ok = Command::new("kill").args(["-HUP", &self.child.id().to_string()]).status().expect("kill");
        assert!(ok.success());
        std::thread::sleep(Duration::from_millis(300));
    }
}
